"""Tests for sloth_fx.kernels.add_rmsnorm: Triton forward/backward vs float64 and vs the unfused ops.

Two yardsticks for every case:

* **float64 maths**: ``add_rmsnorm_reference`` on float64 copies with no intermediate rounding,
  gradients by autograd over it; the fused op is within the tolerance of its lowest-precision dtype.
* **the unfused ops**: ``h = x + residual`` and ``rmsnorm(h, ...)`` (sloth_fx/kernels/rmsnorm.py, tested on
  its own), with autograd summing h's two gradients. The fused op must give the same numbers: ``h``
  and the normed output bit for bit, and the gradients bit for bit (the same backward kernel, the
  same sum in h's dtype), where both run the same kernels.

Every buffer the kernels allocate starts as NaN, and every output must be finite, so an element a
kernel fails to write fails the test.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sloth_fx.kernels.add_rmsnorm as fused
import sloth_fx.kernels.rmsnorm_kernel as rms_kernel
from sloth_fx.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_reference, add_rmsnorm_supports
from sloth_fx.kernels.rmsnorm import rmsnorm

EPS = 1e-6
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # by norm, against float64
SHAPES = [(1, 1, 64), (2, 8, 128), (3, 7, 96), (1, 3, 3200), (1, 1, 1), (4, 2, 11), (5, 130), (37, 24)]


@pytest.fixture(autouse=True)
def poison_and_seed(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Every kernel-written buffer (the fused forward's and RMSNorm's backward's) starts as NaN."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(fused, "_empty", nan_empty)
    monkeypatch.setattr(rms_kernel, "_empty", nan_empty)


def variant(name: str, dtype: torch.dtype) -> tuple[float, torch.dtype, dict]:
    """(the weight's centre, its dtype, the op's keyword arguments) of each HF spelling."""
    if name == "llama":
        return 1.0, dtype, dict(normed_dtype=dtype)
    if name == "gemma":
        return 0.0, dtype, dict(weight_offset=1.0, out_dtype=dtype)
    if name == "qlora":  # the norm weight kept in fp32: an fp32 output
        return 1.0, torch.float32, dict(normed_dtype=dtype)
    raise AssertionError(name)


def inputs(shape, dtype, device, name: str, grads: str = "xrw"):
    base, w_dtype, kw = variant(name, dtype)
    x = (3.0 * torch.randn(shape, device=device) + 0.5).to(dtype).requires_grad_("x" in grads)
    residual = (2.0 * torch.randn(shape, device=device) - 0.3).to(dtype).requires_grad_("r" in grads)
    w = (base + 0.5 * torch.randn(shape[-1], device=device)).to(w_dtype).requires_grad_("w" in grads)
    return x, residual, w, kw


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """||out - ref|| / scale (default ||ref||); NaN anywhere gives NaN, which no bound accepts."""
    return ((out.double() - ref).norm() / (ref.norm() if scale is None else scale)).item()


def run(fn, x, residual, w, kw, cotangents=None):
    """(y, h, dx, dresidual, dw) of ``fn``; cotangents (dy, dh) are drawn if not given."""
    y, h = fn(x, residual, w, EPS, **kw)
    if cotangents is None:
        cotangents = (torch.randn(y.shape, device=y.device).to(y.dtype),
                      torch.randn(h.shape, device=h.device).to(h.dtype))
    wanted = [t for t in (x, residual, w) if t.requires_grad]
    pairs = [(o, c) for o, c in zip((y, h), cotangents) if o.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs]) if wanted else ())
    return (y, h, *(next(grads) if t.requires_grad else None for t in (x, residual, w))), cotangents


def unfused(x, residual, w, eps, **kw):
    h = x + residual
    return rmsnorm(h, w, eps, **kw), h


def check(x, residual, w, kw) -> None:
    """The fused op against float64 maths and, bit for bit, against the unfused ops."""
    got, cotangents = run(add_rmsnorm, x, residual, w, kw)
    y, h = got[:2]
    assert type(y.grad_fn).__name__ == "AddRMSNormFunctionBackward"
    assert y.dtype == (kw.get("out_dtype") or torch.promote_types(x.dtype, w.dtype)) and h.dtype == x.dtype
    assert all(torch.isfinite(t).all() for t in got if t is not None)

    x64, r64, w64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, residual, w))
    kw64 = {"weight_offset": kw.get("weight_offset", 0.0)}
    ref, _ = run(add_rmsnorm_reference, x64, r64, w64, kw64, tuple(c.double() for c in cotangents))
    tol = TOL[min((x.dtype, w.dtype, y.dtype), key=lambda d: torch.finfo(d).bits)]
    assert rel_err(y, ref[0]) <= tol and rel_err(h, ref[1]) <= tol
    # d(x) = d(residual) = dh + the norm's dx: measured on the scale of its terms, since the norm's
    # dx cancels strongly where the row is nearly parallel to dy * w
    rstd = torch.rsqrt(ref[1].detach().pow(2).mean(-1, keepdim=True) + EPS)
    scale = (rstd * cotangents[0].double() * (w64.detach() + kw64["weight_offset"])).norm() + cotangents[1].norm()
    for g, g64 in zip(got[2:4], ref[2:4]):
        assert g is None or (g.dtype == x.dtype and rel_err(g, g64, scale) <= tol)
    assert got[4] is None or (got[4].dtype == w.dtype and rel_err(got[4], ref[4]) <= tol)

    expected, _ = run(unfused, x, residual, w, kw, cotangents)
    for a, b in zip(got, expected):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name", ["llama", "gemma", "qlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_forward_backward(shape, dtype, name, device) -> None:
    check(*inputs(shape, dtype, device, name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 100), (2, 2, 128), (7, 65)], ids=str)
def test_kernel_looped_tiles(shape, dtype, device, monkeypatch) -> None:
    """128-byte tiles force the looped path (rows of several tiles, a partial last one)."""
    monkeypatch.setattr(rms_kernel, "_MAX_TILE_BYTES", 128)
    assert not rms_kernel._block_config(shape[-1], torch.tensor([], dtype=dtype).element_size())[1]
    check(*inputs(shape, dtype, device, "llama"))


@pytest.mark.parametrize("grads", ["x", "r", "w", "xr"])
def test_kernel_partial_grads(grads, device) -> None:
    """Only some inputs need a gradient (a frozen norm weight: the LoRA case)."""
    check(*inputs((3, 5, 96), torch.float16, device, "qlora", grads))


def test_kernel_h_unused_elsewhere(device) -> None:
    """Only the normed output is used: h's gradient is autograd's zeros, d(x) the norm's dx."""
    x, residual, w, kw = inputs((4, 48), torch.float32, device, "llama")
    y, _ = add_rmsnorm(x, residual, w, EPS, **kw)
    dy = torch.randn_like(y)
    y_ref, _ = unfused(x, residual, w, EPS, **kw)
    for a, b in zip(torch.autograd.grad(y, (x, residual, w), dy), torch.autograd.grad(y_ref, (x, residual, w), dy)):
        assert torch.equal(a, b)


def test_kernel_non_contiguous(device) -> None:
    base = (torch.randn(7, 3, 96, device=device)).requires_grad_()
    x = base.transpose(0, 1)
    residual = torch.randn(3, 96 + 32, 7, device=device)[:, 16:112].transpose(1, 2).requires_grad_()
    check(x, residual, torch.randn(96, device=device).requires_grad_(), {})


def test_kernel_no_rows(device) -> None:
    x, residual, w, kw = inputs((0, 3, 64), torch.float32, device, "llama")
    y, h = add_rmsnorm(x, residual, w, EPS, **kw)
    assert y.shape == h.shape == (0, 3, 64)
    dx, dr, dw = torch.autograd.grad((y, h), (x, residual, w), (torch.empty_like(y), torch.empty_like(h)))
    assert dx.shape == dr.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("module,kernel", [(fused, "_add_rmsnorm_fwd_kernel"), (rms_kernel, "_rmsnorm_bwd_kernel")])
def test_poisoned_outputs_are_caught(module, kernel, device, monkeypatch) -> None:
    """A kernel that writes nothing leaves NaN, and NaN never passes the checks."""
    monkeypatch.setattr(module, kernel, _NoLaunch())
    with pytest.raises(AssertionError):
        check(*inputs((2, 3, 16), torch.float32, device, "llama"))


def test_nan_stays_in_its_row(device) -> None:
    """A NaN input makes its own row of y and h NaN, as HF's ops do, and no other."""
    x, residual, w, kw = inputs((3, 16), torch.float32, device, "llama", grads="")
    x[1, 5] = float("nan")
    y, h = add_rmsnorm(x, residual, w, EPS, **kw)
    assert y[1].isnan().all() and h[1, 5].isnan()
    assert torch.isfinite(y[[0, 2]]).all() and torch.isfinite(h[[0, 2]]).all()
    assert not rel_err(y, add_rmsnorm_reference(x.double(), residual.double(), w.double(), EPS)[0]) <= 1.0


def test_dispatch_falls_back_to_reference(monkeypatch) -> None:
    monkeypatch.setattr(fused, "use_triton", lambda *t: False)
    x, residual, w, kw = inputs((3, 5, 40), torch.float16, "cpu", "qlora")
    y, h = add_rmsnorm(x, residual, w, EPS, **kw)
    assert "AddRMSNorm" not in type(y.grad_fn).__name__
    expected = add_rmsnorm_reference(x, residual, w, EPS, **kw)
    assert torch.equal(y, expected[0]) and torch.equal(h, expected[1])


def _refused(kind: str):
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    cases = {
        "broadcast": (ValueError, "would broadcast", (x, torch.randn(8), w)),
        "dtypes": (TypeError, "adds torch.float16 to torch.float32", (x, x.half(), w)),
        "devices": (ValueError, "on meta", (x, x.to("meta"), w)),
        "not_tensor": (TypeError, "residual must be a tensor", (x, 1.0, w)),
        "rmsnorm's": (TypeError, "x.dtype", (x.double(), x.double(), w)),
    }
    return cases[kind]


@pytest.mark.parametrize("kind", ["broadcast", "dtypes", "devices", "not_tensor", "rmsnorm's"])
def test_supports_answers_what_the_op_raises(kind) -> None:
    error, reason, args = _refused(kind)
    assert reason in add_rmsnorm_supports(*args, EPS)
    with pytest.raises(error, match=reason):
        add_rmsnorm(*args, EPS)


def test_supports_takes_fake_tensors() -> None:
    with FakeTensorMode():
        x, w = torch.empty(2, 5, 64, dtype=torch.bfloat16), torch.empty(64)
        assert add_rmsnorm_supports(x, torch.empty_like(x), w, EPS, normed_dtype=torch.bfloat16) is None
        assert "would broadcast" in add_rmsnorm_supports(x, torch.empty(1, 5, 64, dtype=torch.bfloat16), w, EPS)


# --------------------------------------------------------------------------------------------
# GPU only (the interpreter rounds to bf16 by truncation, not to nearest as torch does)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "gemma", "qlora"])
@pytest.mark.parametrize("shape", [(4096, 4096), (3, 7, 3200), (5, 11), (1, 1), (2, 16385), (1, 40000)], ids=str)
def test_gpu_bf16(shape, name) -> None:
    check(*inputs(shape, torch.bfloat16, "cuda", name))
