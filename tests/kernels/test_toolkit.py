"""The kernels' shared toolkit: the Triton tanh, refusals from checks, the device guard, 4-bit weights."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
import triton.language as tl

from sloth_fx.kernels import toolkit
from sloth_fx.kernels.toolkit import (
    UnsupportedType,
    UnsupportedValue,
    base_weight_shape,
    device_guard,
    is_4bit,
    refusal,
)

_seed = itertools.count(97)


# ---- tanh --------------------------------------------------------------------------------------


@triton.jit
def _tanh_probe(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, toolkit.tanh(x), mask=mask)


def test_kernel_tanh_accuracy(device):
    g = torch.Generator().manual_seed(next(_seed))
    x = torch.cat([
        torch.randn(2000, generator=g) * 3,
        torch.linspace(-1, 1, 2001),
        torch.tensor([0.0, 1e-30, -1e-20, 1e-7, 0.4999999, 0.5, -0.5, 0.5000001, 20.0, -20.0, 1e4, -1e4,
                      float("inf"), -float("inf")]),
    ]).to(device)
    y = torch.full_like(x, float("nan"))
    _tanh_probe[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = torch.tanh(x.double())
    err = (y.double() - ref).abs()
    assert torch.isfinite(y).all()
    # within a few fp32 eps of the true value, relative to the value (so also accurate near 0): about
    # 2 eps in the interpreter; the GPU's approximate exp and division add a little
    eps = torch.finfo(torch.float32).eps
    assert (err <= 6 * eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)).all(), err.max()


@pytest.mark.gpu
def test_gpu_tanh_accuracy():
    test_kernel_tanh_accuracy(torch.device("cuda"))


# ---- refusals ----------------------------------------------------------------------------------


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.float32:
        raise UnsupportedType("op", f"dtype {x.dtype}")
    if x.dim() != 2:
        raise UnsupportedValue("op", f"{x.dim()}-d")
    x.item()  # a check that reads a value is a bug: it must not pass for a refusal


def test_unsupported_is_what_the_callers_catch_and_the_reason_without_the_op():
    with pytest.raises(TypeError, match="^op: dtype torch.float16$"):
        _check(torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="^op: 1-d$"):
        _check(torch.zeros(2))
    assert refusal(_check, torch.zeros(2, 2, dtype=torch.float16)) == "dtype torch.float16"
    assert refusal(_check, torch.zeros(2)) == "1-d"
    assert refusal(_check, torch.zeros(1, 1)) is None
    with pytest.raises(RuntimeError):  # any other error is a bug of the check, not a refusal
        refusal(_check, torch.zeros(2, 2))


# ---- device guard ------------------------------------------------------------------------------


def test_device_guard_is_one_shared_no_op_off_the_gpu():
    assert device_guard(torch.zeros(1)) is device_guard(torch.zeros(2))


@pytest.mark.gpu
def test_device_guard_makes_the_tensors_gpu_current():
    current = torch.device("cuda", torch.cuda.current_device())
    assert device_guard(torch.zeros(1, device=current)) is device_guard(torch.zeros(1))  # free when current
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    other = torch.device("cuda", (current.index + 1) % torch.cuda.device_count())
    with device_guard(torch.zeros(1, device=other)):
        assert torch.cuda.current_device() == other.index
    assert torch.cuda.current_device() == current.index


# ---- 4-bit weights -----------------------------------------------------------------------------


def test_4bit_weight_questions():
    import bitsandbytes as bnb

    dense = torch.nn.Parameter(torch.randn(40, 48))
    quantized = bnb.nn.Params4bit(dense.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    assert not is_4bit(dense) and not is_4bit(dense.data) and base_weight_shape(dense) == (40, 48)
    assert is_4bit(quantized) and base_weight_shape(quantized) == (40, 48)
    assert tuple(quantized.shape) != (40, 48)  # packed storage
