"""Tests for the fused gated-MLP activation (sloth_fx/kernels/gated_mlp.py) against a float64 reference."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.activations import ACT2FN

from sloth_fx.kernels.gated_mlp import (
    ACTIVATIONS,
    GatedMLPFunction,
    _launch_bwd,
    _launch_fwd,
    gated_mlp,
    gated_mlp_reference,
    gated_mlp_supports,
)

_seed = itertools.count(4321)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACTS = list(ACTIVATIONS)
# HF config names for each activation of this module
HF_NAMES = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(next(_seed))


def make_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, gen: torch.Generator, scale: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate spread over [-~8, ~8] (both tails of the activations), up standard normal."""
    g = (scale * torch.randn(shape, generator=gen)).to(device, dtype)
    u = torch.randn(shape, generator=gen).to(device, dtype)
    return g, u


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def reference64(
    g: torch.Tensor, u: torch.Tensor, dy: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g64 = g.detach().double().requires_grad_()
    u64 = u.detach().double().requires_grad_()
    y = gated_mlp_reference(g64, u64, activation)
    dg, du = torch.autograd.grad(y, (g64, u64), dy.double())
    return y.detach(), dg, du


def check_against_reference(
    g: torch.Tensor, u: torch.Tensor, activation: str, gen: torch.Generator
) -> None:
    tol = TOL[g.dtype]
    g = g.detach().requires_grad_()
    u = u.detach().requires_grad_()
    y = gated_mlp(g, u, activation)
    assert type(y.grad_fn).__name__ == f"{GatedMLPFunction.__name__}Backward"
    assert y.shape == g.shape and y.dtype == g.dtype
    dy = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    ry, rdg, rdu = reference64(g, u, dy, activation)
    for name, out, ref in (("y", y, ry), ("dg", dg, rdg), ("du", du, rdu)):
        assert out.dtype == g.dtype
        assert torch.isfinite(out).all(), name
        assert rel_err(out, ref) < tol, (name, rel_err(out, ref))


SHAPES = [(1, 1, 11008), (2, 3, 14336), (3, 5, 37), (1,), (1, 1, 1), (37,), (2, 1025)]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(shape: tuple[int, ...], dtype: torch.dtype, activation: str, device: torch.device) -> None:
    gen = fresh_generator()
    g, u = make_inputs(shape, dtype, device, gen)
    check_against_reference(g, u, activation, gen)


@pytest.mark.parametrize("activation", ACTS)
def test_small_and_large_gate_values(activation: str, device: torch.device) -> None:
    """Gate near zero (where tanh via sigmoid cancels) and far in both tails."""
    gen = fresh_generator()
    g = torch.cat(
        [1e-3 * torch.randn(300, generator=gen), 12.0 * torch.randn(300, generator=gen)]
    ).to(device)
    u = torch.randn(600, generator=gen).to(device)
    check_against_reference(g, u, activation, gen)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype: torch.dtype, activation: str, device: torch.device) -> None:
    gen = fresh_generator()
    g, u = make_inputs((7, 3, 20), dtype, device, gen)
    g, u = g.transpose(0, 2), u[:, :, :].transpose(0, 2)
    assert not g.is_contiguous()
    check_against_reference(g, u, activation, gen)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_poisoned_outputs_all_written(dtype: torch.dtype, activation: str, device: torch.device) -> None:
    """Forward and backward launches into NaN-filled buffers: every element must be written."""
    gen = fresh_generator()
    shape = (3, 1100)  # 3300 elements: several 1024-tiles and a masked tail
    g, u = make_inputs(shape, dtype, device, gen)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    act = ACTIVATIONS[activation]
    y = torch.full(shape, float("nan"), dtype=dtype, device=device)
    dg = torch.full(shape, float("nan"), dtype=dtype, device=device)
    du = torch.full(shape, float("nan"), dtype=dtype, device=device)
    _launch_fwd(g, u, y, act)
    _launch_bwd(dy, g, u, dg, du, act)
    ry, rdg, rdu = reference64(g, u, dy, activation)
    for out, ref in ((y, ry), (dg, rdg), (du, rdu)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype]


def test_only_up_requires_grad(device: torch.device) -> None:
    gen = fresh_generator()
    g, u = make_inputs((4, 33), torch.float32, device, gen)
    u.requires_grad_()
    y = gated_mlp(g, u)
    dy = torch.randn(y.shape, generator=gen).to(device)
    (du,) = torch.autograd.grad(y, (u,), dy)
    _, _, rdu = reference64(g, u, dy, "silu")
    assert rel_err(du, rdu) < 1e-5


def test_empty(device: torch.device) -> None:
    g = torch.zeros(0, 16, device=device, requires_grad=True)
    u = torch.zeros(0, 16, device=device, requires_grad=True)
    y = gated_mlp(g, u)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert g.grad.shape == (0, 16)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_hf(activation: str, dtype: torch.dtype) -> None:
    """gated_mlp_reference(g, u, act) is bit-identical to HF's ACT2FN[name](g) * u."""
    gen = fresh_generator()
    g, u = make_inputs((3, 50), dtype, torch.device("cpu"), gen)
    assert torch.equal(gated_mlp_reference(g, u, activation), ACT2FN[HF_NAMES[activation]](g) * u)


def test_unknown_activation_raises() -> None:
    g, u = torch.randn(2, 3), torch.randn(2, 3)
    for fn in (gated_mlp, gated_mlp_reference):
        with pytest.raises(ValueError, match="relu2"):
            fn(g, u, "relu2")


BAD_INPUTS = [
    (lambda: (torch.randn(2, 3), torch.randn(2, 4)), ValueError, "one shape"),
    (lambda: (torch.randn(2, 3), torch.randn(2, 3).half()), TypeError, "one dtype"),
    (lambda: (torch.randn(2, 3).double(), torch.randn(2, 3).double()), TypeError, "float64"),
    (lambda: (torch.randn(2, 3), [1.0, 2.0, 3.0]), TypeError, "up"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_bad_inputs_raise(make, exc: type[Exception], match: str) -> None:  # noqa: ANN001
    g, u = make()
    with pytest.raises(exc, match=match):
        gated_mlp(g, u)


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_supports_answers_what_the_fused_op_raises(make, exc: type[Exception], match: str) -> None:  # noqa: ANN001
    reason = gated_mlp_supports(*make())
    assert reason is not None and re.search(match, reason), reason


def test_supports_takes_fake_tensors() -> None:
    with FakeTensorMode():
        g = torch.empty(2, 5, 96, dtype=torch.bfloat16)
        assert all(gated_mlp_supports(g, g, act) is None for act in ACTS)
        assert "relu2" in gated_mlp_supports(g, g, "relu2")
        assert "one dtype" in gated_mlp_supports(g, g.float())


# ---------------------------------------------------------------- GPU (bf16, large) -----------


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(4, 512, 11008), (2, 256, 14336)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_forward_backward(shape: tuple[int, ...], dtype: torch.dtype, activation: str) -> None:
    gen = fresh_generator()
    g, u = make_inputs(shape, dtype, torch.device("cuda"), gen)
    check_against_reference(g, u, activation, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTS)
def test_gpu_poisoned_bf16(activation: str) -> None:
    device = torch.device("cuda")
    gen = fresh_generator()
    shape = (5, 3001)
    g, u = make_inputs(shape, torch.bfloat16, device, gen)
    dy = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
    act = ACTIVATIONS[activation]
    y, dg, du = (torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device) for _ in range(3))
    _launch_fwd(g, u, y, act)
    _launch_bwd(dy, g, u, dg, du, act)
    ry, rdg, rdu = reference64(g, u, dy, activation)
    for out, ref in ((y, ry), (dg, rdg), (du, rdu)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_past_int32_offsets() -> None:
    """More than 2^31 elements: the last tile must be addressed correctly."""
    device = torch.device("cuda")
    n = (1 << 31) + 4096 + 5
    gen = torch.Generator(device=device).manual_seed(next(_seed))
    g = torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
    u = torch.randn(n, device=device, dtype=torch.bfloat16, generator=gen)
    y = gated_mlp(g, u)
    tail = slice(n - 5000, n)
    ref = gated_mlp_reference(g[tail].double(), u[tail].double())
    assert torch.isfinite(y[tail]).all()
    assert rel_err(y[tail], ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("activation", ACTS)
def test_dispatch_off_triton_is_hf_exactly(activation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Triton does not run, gated_mlp() is HF's act(g) * up, bit for bit."""
    import sloth_fx.kernels.gated_mlp as swiglu_module

    monkeypatch.setattr(swiglu_module, "use_triton", lambda *tensors: False)
    gen = fresh_generator()
    g, u = make_inputs((3, 41), torch.float16, torch.device("cpu"), gen)
    assert torch.equal(gated_mlp(g, u, activation), ACT2FN[HF_NAMES[activation]](g) * u)


@pytest.mark.parametrize("activation", ACTS)
def test_token_count_changing_between_calls(activation: str, device: torch.device) -> None:
    """Grids are cached per element count: T = 5, 17, 5 rows of 1100 (several tiles and a masked
    tail) each match float64, and the second T = 5 call repeats the first bit for bit."""
    gen = fresh_generator()
    inputs = {t: (*make_inputs((t, 1100), torch.float16, device, gen),
                  torch.randn(t, 1100, generator=gen).to(device, torch.float16)) for t in (5, 17)}
    runs = []
    for t in (5, 17, 5):
        g, u, dy = inputs[t]
        check_against_reference(g, u, activation, gen)
        g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
        y = gated_mlp(g, u, activation)
        runs.append((y, *torch.autograd.grad(y, (g, u), dy)))
    for first, again in zip(runs[0], runs[2]):
        assert torch.equal(first, again)
