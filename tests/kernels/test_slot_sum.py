"""The per-token sum of expert slots (sloth_fx/kernels/slot_sum.py) against float64.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py) on fp32 and fp16 CPU
tensors; the output starts as NaN, so a column or token the kernel forgets fails.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from sloth_fx.kernels.slot_sum import slot_sum

SLOT_MODULE = importlib.import_module("sloth_fx.kernels.slot_sum")


def case(t: int, h: int, k: int, dtype: torch.dtype, seed: int, device: str = "cpu"):
    """``T·k`` slots in a random order, their inverse permutation and router-like weights ``[T, k]``."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randn(t * k, h, generator=gen).to(device, dtype)
    inverse = torch.randperm(t * k, generator=gen).to(device)
    weights = torch.rand(t, k, generator=gen).to(device, dtype)
    return slots, inverse, weights


def float64_sum(slots, inverse, k, weights):
    per_token = slots.double()[inverse].view(-1, k, slots.shape[1])
    return (per_token if weights is None else per_token * weights.double()[..., None]).sum(1)


@pytest.fixture
def poisoned_out(monkeypatch: pytest.MonkeyPatch) -> None:
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))


@pytest.fixture
def kernel_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the Triton kernel should")

    monkeypatch.setattr(SLOT_MODULE, "slot_sum_reference", refuse)


# (T, H, k): one token, odd widths, a row wider than one 1024-column tile, top-1, -2 and -8
@pytest.mark.parametrize("t,h,k", [(1, 5, 1), (7, 45, 2), (13, 130, 8), (3, 1500, 2), (33, 64, 8)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("weighted", [True, False])
def test_kernel_matches_float64(t, h, k, dtype, tol, weighted, poisoned_out, kernel_only):
    slots, inverse, weights = case(t, h, k, dtype, seed=t * h + k)
    weights = weights if weighted else None
    got = slot_sum(slots, inverse, k, weights, dtype)
    ref = float64_sum(slots, inverse, k, weights)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_strided_slots_and_weights_and_fp32_weights_on_fp16_slots(poisoned_out, kernel_only):
    """A column-strided slot view and transposed weights are read by their strides; fp32 router
    weights on 16-bit slots are applied in fp32."""
    slots, inverse, _ = case(9, 24, 2, torch.float16, seed=5)
    wide = torch.randn(18, 48, dtype=torch.float16)[:, ::2]
    wide.copy_(slots)
    weights = torch.rand(2, 9, dtype=torch.float32).t()
    got = slot_sum(wide, inverse, 2, weights, torch.float16)
    ref = float64_sum(slots, inverse, 2, weights)
    torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())


def test_float64_takes_the_reference_exactly():
    slots, inverse, weights = case(7, 45, 2, torch.float64, seed=1)
    assert torch.equal(slot_sum(slots, inverse, 2, weights, torch.float64), float64_sum(slots, inverse, 2, weights))


def test_mismatched_shapes_are_named():
    slots, inverse, weights = case(4, 8, 2, torch.float32, seed=2)
    for args in ((slots[:-1], inverse, 2, weights), (slots, inverse, 3, None), (slots, inverse, 2, weights.t()),
                 (slots, inverse, 0, None)):
        with pytest.raises(ValueError, match=r"must be \[T·k, H\], \[T·k\] and \[T, k\]"):
            slot_sum(*args, torch.float32)


@pytest.mark.gpu
def test_bf16_on_gpu_matches_float64():
    slots, inverse, weights = case(4097, 2048, 8, torch.bfloat16, seed=3, device="cuda")
    for w in (weights, None):
        got = slot_sum(slots, inverse, 8, w, torch.bfloat16)
        ref = float64_sum(slots, inverse, 8, w)
        # one bf16 rounding of an fp32 sum
        torch.testing.assert_close(got.double(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())
