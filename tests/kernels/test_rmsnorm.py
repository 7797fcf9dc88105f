"""Tests for sloth_fx.kernels.rmsnorm: reference vs HF, Triton forward/backward vs float64, errors.

Two comparisons are made for every kernel case, because each catches what the other cannot:

* **float64 maths** (``check_against_fp64``): x and w are upcast to float64 and run through
  ``rmsnorm_reference`` with ``normed_dtype=None``, i.e. the exact maths with no rounding at all;
  gradients come from autograd over it. This is the right yardstick for the *gradients*: autograd
  treats HF's ``.to(x.dtype)`` as the identity, and so does the kernel's dx. The kernel differs from
  it only by the roundings HF itself imposes (n to normed_dtype, y to out_dtype, dx/dw to their
  dtypes: a few units of 2**-11 for fp16) and fp32 accumulation, so tolerances are by the lowest
  precision dtype involved, measured by norm.
* **same-dtype reference** (``check_against_same_dtype``): the kernel's forward against
  ``rmsnorm_reference`` in the input dtypes, which is bitwise HF. It checks that the intermediate
  rounding sits where HF puts it: at most one ulp apart, and (where a 16-bit rounding is involved)
  bitwise equal in all but 1% of elements. A kernel that dropped or misplaced the rounding stays
  within the float64 tolerance but fails this (``test_same_dtype_check_catches_missing_rounding``
  shows the check has teeth).

Every buffer the kernels allocate is pre-filled with NaN (``_empty`` is patched), and every output
must be finite, so an element a kernel fails to write fails the test.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import sloth_fx.kernels.rmsnorm as rms
import sloth_fx.kernels.rmsnorm_kernel as rms_kernel
from sloth_fx.kernels.rmsnorm import RMSNormFunction, rmsnorm, rmsnorm_reference, rmsnorm_supports

EPS = 1e-6

# Relative (by norm) tolerance against float64, by the lowest-precision dtype involved.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# One unit in the last place, relative, of a 16-bit dtype (fp16: 10 stored mantissa bits, bf16: 7).
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

SHAPES = [(1, 1, 64), (3, 7, 96), (1, 3, 3200), (1, 1, 1), (4, 2, 11), (5, 130)]
VARIANTS = ["llama", "gemma", "qlora", "plain"]


def seed_for(request: pytest.FixtureRequest) -> None:
    """A fresh, reproducible seed per test case (from its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Every kernel-written buffer starts as NaN; also seeds the case."""
    seed_for(request)

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(rms_kernel, "_empty", nan_empty)


def variant_args(variant: str, x_dtype: torch.dtype) -> tuple[torch.dtype, dict]:
    """(weight dtype, rmsnorm kwargs) of each HF spelling."""
    if variant == "llama":  # LlamaRMSNorm, weight in the model dtype
        return x_dtype, dict(normed_dtype=x_dtype)
    if variant == "gemma":  # GemmaRMSNorm
        return x_dtype, dict(weight_offset=1.0, out_dtype=x_dtype)
    if variant == "qlora":  # LlamaRMSNorm with the norm weight kept in fp32 (output fp32)
        return torch.float32, dict(normed_dtype=x_dtype)
    if variant == "plain":  # no intermediate rounding, default output dtype
        return x_dtype, dict()
    raise AssertionError(variant)


def make_weight(n: int, dtype: torch.dtype, device, variant: str) -> torch.Tensor:
    # Gemma stores the weight as an offset from 1 (initialised to 0); the others around 1.
    base = 0.0 if variant == "gemma" else 1.0
    return (base + 0.5 * torch.randn(n, device=device)).to(dtype).requires_grad_()


def make_x(shape, dtype, device) -> torch.Tensor:
    # Not unit scale and not centred, so a wrong mean / eps / rstd shows.
    return (3.0 * torch.randn(shape, device=device) + 0.5).to(dtype)


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    scale = ref.norm() if scale is None else scale
    return ((out.double() - ref).norm() / scale).item()


def lowest_precision(*dtypes: torch.dtype | None) -> torch.dtype:
    order = [torch.bfloat16, torch.float16, torch.float32]
    return next(d for d in order if d in dtypes)


def check_against_fp64(x: torch.Tensor, w: torch.Tensor, kw: dict, eps: float = EPS) -> torch.Tensor:
    """Run rmsnorm on x, backward with a random dy, and compare y and the gradients of the
    inputs that require grad to autograd over the float64 reference. Returns y.

    With an fp32 weight and a 16-bit normed_dtype (QLoRA), dw is also held to fp32 accuracy
    against ``sum(dy * n_rounded)``: that is what pins the rounding of n in dw, which the
    float64 comparison (unrounded n) cannot resolve."""
    y = rmsnorm(x, w, eps, **kw)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    out_dtype = kw.get("out_dtype") or torch.promote_types(x.dtype, w.dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in (x, w) if t.requires_grad], dy)
    grads = dict(zip([n for n, t in (("x", x), ("w", w)) if t.requires_grad], grads))

    offset = kw.get("weight_offset", 0.0)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = rmsnorm_reference(x64, w64, eps, weight_offset=offset)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    tol = TOL[lowest_precision(x.dtype, w.dtype, out_dtype)]

    assert rel_err(y, y64) <= tol, rel_err(y, y64)
    if "x" in grads:
        dx = grads["x"]
        assert dx.dtype == x.dtype and dx.shape == x.shape
        assert torch.isfinite(dx).all()
        # dx = r * (g - n * mean(g n)) cancels strongly when n is nearly parallel to g (always so
        # for hidden 1, where dx ~ eps); measure its error on the scale of its terms, ||r * g||.
        r64 = torch.rsqrt(x64.detach().pow(2).mean(-1, keepdim=True) + eps)
        scale = (r64 * dy.double() * (w64.detach() + offset)).norm()
        assert rel_err(dx, dx64, scale) <= tol, rel_err(dx, dx64, scale)
    if "w" in grads:
        dw = grads["w"]
        assert dw.dtype == w.dtype and dw.shape == w.shape
        assert torch.isfinite(dw).all()
        assert rel_err(dw, dw64) <= tol, rel_err(dw, dw64)
        normed_dtype = kw.get("normed_dtype")
        if w.dtype == torch.float32 and normed_dtype in ULP:
            ones = torch.ones(w.shape, dtype=torch.float32, device=w.device)
            n_rounded = rmsnorm_reference(x.detach(), ones, eps, normed_dtype=normed_dtype).double()
            dw_rounded = (dy.double() * n_rounded).reshape(-1, w.shape[0]).sum(0)
            assert rel_err(dw, dw_rounded) <= TOL[torch.float32], rel_err(dw, dw_rounded)
    return y


def check_against_same_dtype(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, kw: dict, eps: float = EPS
) -> None:
    """Kernel forward vs the reference in the input dtypes (bitwise HF): within one ulp per 16-bit
    rounding on the way (the normalised value, then the output: two on the GPU, where rsqrt is
    approximate and a last-bit flip in the normalised value can carry into the product), and,
    where a 16-bit rounding is involved, bitwise equal in all but 1% of the elements (flips from
    fp32 last-bit differences in rstd are rare; a misplaced rounding changes far more)."""
    ref = rmsnorm_reference(x.detach(), w.detach(), eps, **kw)
    assert ref.dtype == y.dtype
    rounded = [d for d in (kw.get("normed_dtype"), y.dtype) if d in ULP]
    if not rounded:
        torch.testing.assert_close(y.detach(), ref, rtol=2e-6, atol=1e-6)
        return
    ulp = max(ULP[d] for d in rounded) * len(rounded)
    torch.testing.assert_close(y.detach().float(), ref.float(), rtol=ulp, atol=1e-6)
    mismatch = (y.detach() != ref).float().mean().item()
    assert mismatch <= 0.01, mismatch


# --------------------------------------------------------------------------------------------
# Reference vs Hugging Face (reference path, CPU, bitwise)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_fp32", [False, True], ids=["w_same", "w_fp32"])
def test_reference_is_bitwise_llama(dtype: torch.dtype, weight_fp32: bool) -> None:
    n = 96
    hf = LlamaRMSNorm(n, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(1.0 + 0.5 * torch.randn(n))
    if not weight_fp32:
        hf = hf.to(dtype)
    x = make_x((3, 5, n), dtype, "cpu")
    expected = hf(x)
    got = rmsnorm_reference(x, hf.weight, EPS, normed_dtype=dtype)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_fp32", [False, True], ids=["w_same", "w_fp32"])
def test_reference_is_bitwise_gemma(dtype: torch.dtype, weight_fp32: bool) -> None:
    n = 96
    hf = GemmaRMSNorm(n, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(0.5 * torch.randn(n))
    if not weight_fp32:
        hf = hf.to(dtype)
    x = make_x((3, 5, n), dtype, "cpu")
    expected = hf(x)
    got = rmsnorm_reference(x, hf.weight, EPS, weight_offset=1.0, out_dtype=dtype)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


DT = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("x_dtype", DT)
@pytest.mark.parametrize("w_dtype", DT)
@pytest.mark.parametrize("normed_dtype", [None, *DT])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_reference_matches_spec_formula(x_dtype, w_dtype, normed_dtype, out_dtype, offset) -> None:
    """y = ((w_f32 + offset) * round(x_f32 * r)).to(out_dtype), product in fp32, bitwise."""
    x = make_x((4, 33), x_dtype, "cpu")
    w = (1.0 + 0.5 * torch.randn(33)).to(w_dtype)
    h = x.float()
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    if normed_dtype is not None:
        n = n.to(normed_dtype).float()
    expected = ((w.float() + offset) * n).to(out_dtype or torch.promote_types(x_dtype, w_dtype))
    got = rmsnorm_reference(x, w, EPS, weight_offset=offset, normed_dtype=normed_dtype, out_dtype=out_dtype)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, real kernels on GPU)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_forward_backward(shape, dtype, variant, device) -> None:
    w_dtype, kw = variant_args(variant, dtype)
    x = make_x(shape, dtype, device).requires_grad_()
    w = make_weight(shape[-1], w_dtype, device, variant)
    y = check_against_fp64(x, w, kw)
    check_against_same_dtype(y, x, w, kw)


def test_kernel_single_long_row(device) -> None:
    """Hidden 16384 fp32: the longest row held as one tile."""
    assert rms_kernel._block_config(16384, 4)[1]
    x = make_x((1, 1, 16384), torch.float32, device).requires_grad_()
    w = make_weight(16384, torch.float32, device, "llama")
    y = check_against_fp64(x, w, dict(normed_dtype=torch.float32))
    check_against_same_dtype(y, x, w, dict(normed_dtype=torch.float32))


def test_kernel_row_longer_than_a_tile(device) -> None:
    """Hidden 40000 fp16 is beyond one 64 KiB tile: the looped kernels, without patching."""
    block, single, _ = rms_kernel._block_config(40000, 2)
    assert not single and block == 32768
    x = make_x((1, 2, 40000), torch.float16, device).requires_grad_()
    w = make_weight(40000, torch.float16, device, "llama")
    kw = dict(normed_dtype=torch.float16)
    y = check_against_fp64(x, w, kw)
    check_against_same_dtype(y, x, w, kw)


@pytest.mark.parametrize("variant", ["llama", "gemma", "qlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 100), (2, 2, 128), (5, 1, 200), (7, 65)], ids=str)
def test_kernel_looped_tiles(shape, dtype, variant, device, monkeypatch) -> None:
    """Small tiles (128 bytes: 32 fp32 / 64 fp16 elements) force the looped path on small
    shapes: several tiles per row, a partial last tile, exact multiples, and several rows per
    backward program so the dw partial accumulates in memory."""
    monkeypatch.setattr(rms_kernel, "_MAX_TILE_BYTES", 128)
    block, single, _ = rms_kernel._block_config(shape[-1], torch.tensor([], dtype=dtype).element_size())
    assert not single and block in (32, 64)
    w_dtype, kw = variant_args(variant, dtype)
    x = make_x(shape, dtype, device).requires_grad_()
    w = make_weight(shape[-1], w_dtype, device, variant)
    y = check_against_fp64(x, w, kw)
    check_against_same_dtype(y, x, w, kw)


def test_block_config() -> None:
    assert rms_kernel._block_config(4096, 2) == (4096, True, 16)
    assert rms_kernel._block_config(1024, 2) == (1024, True, 4)
    assert rms_kernel._block_config(11, 4) == (16, True, 1)
    assert rms_kernel._block_config(1, 4) == (1, True, 1)
    assert rms_kernel._block_config(32768, 2)[:2] == (32768, True)
    assert rms_kernel._block_config(16385, 4)[:2] == (16384, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "last_dim_strided"])
def test_kernel_non_contiguous(layout, dtype, device) -> None:
    """x as a view: leading dims that do not flatten (copied), a row stride wider than the row
    (used as is), a last dim with stride != 1 (copied); dy a non-contiguous view as well."""
    n = 96
    if layout == "transposed":
        base = make_x((7, 3, n), dtype, device).requires_grad_()
        x = base.transpose(0, 1)
    elif layout == "sliced":
        base = make_x((3, 5, n + 64), dtype, device).requires_grad_()
        x = base[..., 16 : 16 + n]
        assert rms_kernel._as_rows(x).data_ptr() == x.data_ptr()  # no copy: the row stride is used
    else:
        base = make_x((3, n, 5), dtype, device).requires_grad_()
        x = base.transpose(-1, -2)
    assert not x.is_contiguous()
    w_dtype, kw = variant_args("llama", dtype)
    w = make_weight(n, w_dtype, device, "llama")
    out_dtype = torch.promote_types(dtype, w_dtype)
    dy = torch.randn((*x.shape[:-1], 2 * n), device=device).to(out_dtype)[..., ::2]
    assert not dy.is_contiguous()
    y = check_against_fp64_view(base, x, w, kw, dy)
    check_against_same_dtype(y, x, w, kw)


def check_against_fp64_view(base, x, w, kw, dy) -> torch.Tensor:
    """As check_against_fp64, with the gradient taken w.r.t. the base of the view x."""
    y = rmsnorm(x, w, EPS, **kw)
    assert torch.isfinite(y).all()
    dbase, dw = torch.autograd.grad(y, (base, w), dy)
    base64 = base.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    # the same view of the float64 base
    x64 = base64.as_strided(x.shape, x.stride(), x.storage_offset() - base.storage_offset())
    y64 = rmsnorm_reference(x64, w64, EPS)
    dbase64, dw64 = torch.autograd.grad(y64, (base64, w64), dy.double())
    tol = TOL[x.dtype]
    assert rel_err(y, y64) <= tol
    assert dbase.dtype == base.dtype and torch.isfinite(dbase).all()
    assert rel_err(dbase, dbase64) <= tol
    assert dw.dtype == w.dtype and torch.isfinite(dw).all()
    assert rel_err(dw, dw64) <= tol
    return y


def test_kernel_broadcast_grad(device) -> None:
    """dy with row stride 0 (a gradient expanded over the rows) and with all strides 0."""
    x = make_x((3, 5, 24), torch.float32, device).requires_grad_()
    w = make_weight(24, torch.float32, device, "llama")
    for dy in (torch.randn(24, device=device).expand(3, 5, 24), torch.tensor(0.7, device=device).expand(3, 5, 24)):
        y = rmsnorm(x, w, EPS)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        x64 = x.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_()
        dx64, dw64 = torch.autograd.grad(rmsnorm_reference(x64, w64, EPS), (x64, w64), dy.double())
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
        assert rel_err(dx, dx64) <= TOL[torch.float32]
        assert rel_err(dw, dw64) <= TOL[torch.float32]


@pytest.mark.parametrize("which", ["x_only", "w_only"])
def test_kernel_partial_grads(which, device) -> None:
    """Weight without grad (frozen norm, the LoRA case): no dw; x without grad: dw only."""
    x = make_x((3, 5, 96), torch.float16, device).requires_grad_(which == "x_only")
    w = make_weight(96, torch.float32, device, "llama").requires_grad_(which == "w_only")
    check_against_fp64(x, w, dict(normed_dtype=torch.float16))


@pytest.mark.parametrize("tiles", ["single", "looped"])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
def test_kernel_eps_matters(variant, tiles, device, monkeypatch) -> None:
    """Inputs with mean(x^2) of the order of eps, so that eps is not lost in the sum."""
    if tiles == "looped":
        monkeypatch.setattr(rms_kernel, "_MAX_TILE_BYTES", 64)
    w_dtype, kw = variant_args(variant, torch.float32)
    x = (0.3 * torch.randn((3, 4, 40), device=device)).requires_grad_()
    w = make_weight(40, w_dtype, device, variant)
    y = check_against_fp64(x, w, kw, eps=0.1)
    check_against_same_dtype(y, x, w, kw, eps=0.1)


def test_kernel_many_rows_per_program(device) -> None:
    """Enough rows that every backward program sums several (uneven) rows into its dw partial."""
    x = make_x((37, 24), torch.float32, device).requires_grad_()
    w = make_weight(24, torch.float32, device, "gemma")
    check_against_fp64(x, w, dict(weight_offset=1.0, out_dtype=torch.float32))


def test_kernel_no_rows(device) -> None:
    x = torch.empty((0, 3, 64), device=device, requires_grad=True)
    w = make_weight(64, torch.float32, device, "llama")
    y = rmsnorm(x, w, EPS)
    assert y.shape == (0, 3, 64)
    dx, dw = torch.autograd.grad(y, (x, w), torch.empty_like(y))
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


def test_same_dtype_check_catches_missing_rounding(device) -> None:
    """The same-dtype comparison is what pins the rounding of n: the kernel run without it
    (normed_dtype=None) passes the float64 tolerance but not the same-dtype check vs HF Llama."""
    x = make_x((4, 7, 96), torch.float16, device).requires_grad_()
    w = make_weight(96, torch.float32, device, "llama")
    y = check_against_fp64(x, w, dict())  # no rounding: still close to the exact maths
    with pytest.raises(AssertionError):
        check_against_same_dtype(y, x, w, dict(normed_dtype=torch.float16))


@pytest.mark.parametrize("kernel", ["_rmsnorm_fwd_kernel", "_rmsnorm_bwd_kernel"])
def test_poisoned_buffers_are_detected(kernel, device, monkeypatch) -> None:
    """The NaN poisoning reaches the outputs if a kernel skips its writes: with one launch
    skipped, the checks must fail."""
    monkeypatch.setattr(rms_kernel, kernel, _NoLaunch())
    x = make_x((2, 3, 16), torch.float32, device).requires_grad_()
    w = make_weight(16, torch.float32, device, "llama")
    with pytest.raises(AssertionError):
        check_against_fp64(x, w, dict())


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# --------------------------------------------------------------------------------------------
# Dispatch and errors


def test_dispatch_falls_back_to_reference(monkeypatch) -> None:
    monkeypatch.setattr(rms, "use_triton", lambda *t: False)
    x = make_x((3, 5, 40), torch.float16, "cpu").requires_grad_()
    w = make_weight(40, torch.float32, "cpu", "llama")
    y = rmsnorm(x, w, EPS, normed_dtype=torch.float16)
    assert "RMSNormFunction" not in type(y.grad_fn).__name__
    assert torch.equal(y, rmsnorm_reference(x, w, EPS, normed_dtype=torch.float16))


def test_function_apply_directly(device) -> None:
    x = make_x((2, 9), torch.float32, device).requires_grad_()
    w = make_weight(9, torch.float32, device, "llama")
    y = RMSNormFunction.apply(x, w, EPS, 0.0, None, torch.float32)
    torch.testing.assert_close(y, rmsnorm_reference(x, w, EPS), rtol=2e-6, atol=1e-6)


def _bad(kind: str):
    x = torch.randn(2, 3, 8)
    w = torch.randn(8)
    cases = {
        "x_float64": (TypeError, "x.dtype", (x.double(), w), {}),
        "x_int": (TypeError, "x.dtype", (x.to(torch.int32), w), {}),
        "w_float64": (TypeError, "weight.dtype", (x, w.double()), {}),
        "normed_float64": (TypeError, "normed_dtype", (x, w), dict(normed_dtype=torch.float64)),
        "out_int": (TypeError, "out_dtype", (x, w), dict(out_dtype=torch.int64)),
        "w_shape_short": (ValueError, "weight.shape", (x, torch.randn(7)), {}),
        "w_shape_2d": (ValueError, "weight.shape", (x, torch.randn(1, 8)), {}),
        "x_scalar": (ValueError, "last dim", (torch.tensor(1.0), torch.randn(1)), {}),
        "x_zero_width": (ValueError, "last dim", (torch.randn(2, 0), torch.randn(0)), {}),
        "devices": (ValueError, "device|meta", (x, w.to("meta")), {}),
        "x_not_tensor": (TypeError, "tensors", ([1.0, 2.0], w), {}),
    }
    return cases[kind]


BAD_KINDS = ["x_float64", "x_int", "w_float64", "normed_float64", "out_int", "w_shape_short", "w_shape_2d",
             "x_scalar", "x_zero_width", "devices", "x_not_tensor"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_inputs_raise(kind: str) -> None:
    err, match, args, kw = _bad(kind)
    with pytest.raises(err, match=match):
        rmsnorm(*args, EPS, **kw)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_supports_answers_what_the_op_raises(kind: str) -> None:
    _, match, args, kw = _bad(kind)
    reason = rmsnorm_supports(*args, EPS, **kw)
    assert reason is not None and re.search(match, reason), reason


def test_supports_takes_fake_tensors() -> None:
    with FakeTensorMode():
        x, w = torch.empty(2, 5, 64, dtype=torch.bfloat16), torch.empty(64)
        assert rmsnorm_supports(x, w, EPS, normed_dtype=torch.bfloat16, out_dtype=torch.float32) is None
        assert "weight.shape" in rmsnorm_supports(x, torch.empty(63), EPS)
        assert "eps" in rmsnorm_supports(x, w, -1.0)


def test_negative_eps_raises() -> None:
    with pytest.raises(ValueError, match="eps"):
        rmsnorm(torch.randn(2, 8), torch.randn(8), -1.0)


# --------------------------------------------------------------------------------------------
# GPU only (bf16 is mishandled by the interpreter; training-size shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "gemma", "qlora", "plain"])
@pytest.mark.parametrize(
    "shape", [(4096, 4096), (3, 7, 3200), (5, 11), (1, 1), (2, 5120), (1, 16384), (2, 16385), (1, 40000)], ids=str
)
def test_gpu_bf16(shape, variant) -> None:
    w_dtype, kw = variant_args(variant, torch.bfloat16)
    x = make_x(shape, torch.bfloat16, "cuda").requires_grad_()
    w = make_weight(shape[-1], w_dtype, "cuda", variant)
    y = check_against_fp64(x, w, kw)
    check_against_same_dtype(y, x, w, kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["llama", "gemma", "qlora"])
def test_gpu_training_shape(dtype, variant) -> None:
    w_dtype, kw = variant_args(variant, dtype)
    x = make_x((4, 1024, 4096), dtype, "cuda").requires_grad_()
    w = make_weight(4096, w_dtype, "cuda", variant)
    y = check_against_fp64(x, w, kw)
    check_against_same_dtype(y, x, w, kw)


@pytest.mark.gpu
def test_gpu_bf16_matches_hf_llama() -> None:
    """The kernel against HF's own module on the GPU (bf16, weight fp32 as in QLoRA)."""
    hf = LlamaRMSNorm(4096, eps=EPS).cuda()
    with torch.no_grad():
        hf.weight.copy_(1.0 + 0.5 * torch.randn(4096, device="cuda"))
    x = make_x((2, 256, 4096), torch.bfloat16, "cuda")
    y = rmsnorm(x, hf.weight, EPS, normed_dtype=torch.bfloat16)
    ref = hf(x)
    assert y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=ULP[torch.bfloat16], atol=1e-6)
    assert (y != ref).float().mean().item() <= 0.01


@pytest.mark.parametrize("variant", ["llama", "qlora"])
def test_token_count_changing_between_calls(variant, device) -> None:
    """Launch grids are cached per row count: T = 5, 17, 5 each match float64, and the second
    T = 5 call (a cached grid after another shape) repeats the first bit for bit."""
    w_dtype, kw = variant_args(variant, torch.float16)
    w = make_weight(96, w_dtype, device, variant)
    x5 = make_x((5, 96), torch.float16, device).requires_grad_()
    x17 = make_x((17, 96), torch.float16, device).requires_grad_()
    runs = []
    for x in (x5, x17, x5):
        check_against_same_dtype(check_against_fp64(x, w, kw), x, w, kw)
        y = rmsnorm(x, w, EPS, **kw)
        torch.manual_seed(x.shape[0])  # the same dy for the same T
        dy = torch.randn(y.shape, device=device).to(y.dtype)
        runs.append((y, *torch.autograd.grad(y, (x, w), dy)))
    for first, again in zip(runs[0], runs[2]):
        assert torch.equal(first, again)
