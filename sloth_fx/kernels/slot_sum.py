"""Each token's sum over its expert slots: the last step of a routed-experts layer's forward (and of
its input gradient in backward).

A routed-experts layer computes on ``S = T·k`` slots, one per token and chosen expert, sorted by
expert. Slot ``inverse[t·k + j]`` holds token ``t``'s ``j``-th expert's output row. Then::

    out[t] = Σ_j w[t, j] · slots[inverse[t·k + j]]          (w = 1 where no weights are given)

summed in fp32 in the order ``j = 0 .. k-1``, one rounding into ``out``'s dtype. The forward's
weights are the router's top-k probabilities; backward's ``dX`` sum has none.

Kernel: one program per token and ``BLOCK`` columns of ``H``; it reads the token's k slot rows
once and writes its output row once, so it moves ``(S + T)·H`` elements. The plain-PyTorch
reference (float64, CPU without the interpreter) gathers the slots per token, ``[T, k, H]``, and
reduces them. No autograd: the routed-experts op calls it in its forward and its backward, whose
formulas it derives itself (``d slots[inverse[t·k + j]] = w[t, j]·d out[t]``, ``d w[t, j] =
slots[inverse[t·k + j]]·d out[t]``); nothing is saved.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .launch import launch
from .toolkit import SUPPORTED_DTYPES, cdiv, next_power_of_2, use_triton

__all__ = ["slot_sum", "slot_sum_reference"]

_MAX_BLOCK = 1024


@triton.jit
def _slot_sum_kernel(slots_ptr, inverse_ptr, w_ptr, out_ptr, H, stride_s, stride_sh, stride_wt, stride_wk, stride_o,
                     K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, tile] = Σ_j w[t, j]·slots[inverse[t·K + j], tile], fp32, j in order."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(K):
        slot = tl.load(inverse_ptr + t * K + j).to(tl.int64)
        row = tl.load(slots_ptr + slot * stride_s + cols * stride_sh, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            row = row * tl.load(w_ptr + t * stride_wt + j * stride_wk).to(tl.float32)
        acc += row
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=256)
def _blocks(h: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a row's columns in tiles of at most 1024."""
    block = min(_MAX_BLOCK, next_power_of_2(max(h, 1)))
    return block, 4 if block <= 512 else 8


def slot_sum_reference(slots: torch.Tensor, inverse: torch.Tensor, k: int, weights: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """:func:`slot_sum` in plain PyTorch: the slots gathered per token, ``[T, k, H]``, in fp32
    (float64 for float64), weighted and summed over k."""
    wide = torch.promote_types(dtype, torch.float32)
    per_token = slots.index_select(0, inverse).view(-1, k, slots.shape[1]).to(wide)
    if weights is not None:
        per_token = per_token * weights.to(wide)[..., None]
    return per_token.sum(1).to(dtype)


def slot_sum(slots: torch.Tensor, inverse: torch.Tensor, k: int, weights: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]`` in ``dtype``: the module doc's sum for ``slots [S, H]`` (any strides), ``inverse`` (int64 ``[S]``,
    token ``t``'s ``j``-th slot at ``inverse[t·k + j]``), ``k`` and ``weights [T, k]`` or None."""
    if k < 1 or slots.shape[0] != inverse.shape[0] or inverse.shape[0] % k \
            or (weights is not None and tuple(weights.shape) != (inverse.shape[0] // k, k)):
        raise ValueError(f"slots {tuple(slots.shape)}, inverse {tuple(inverse.shape)} and weights "
                         f"{None if weights is None else tuple(weights.shape)} must be [T·k, H], [T·k] and [T, k] "
                         f"for k={k}")
    if not (use_triton(slots) and slots.dtype in SUPPORTED_DTYPES and dtype in SUPPORTED_DTYPES):
        return slot_sum_reference(slots, inverse, k, weights, dtype)
    t, h = inverse.shape[0] // k, slots.shape[1]
    out = torch.empty(t, h, device=slots.device, dtype=dtype)
    if t and h:
        block, warps = _blocks(h)
        w = slots if weights is None else weights  # an unused pointer without weights
        stride_wt, stride_wk = (0, 0) if weights is None else weights.stride()
        launch(_slot_sum_kernel, (t, cdiv(h, block)), slots, inverse, w, out, h, *slots.stride(), stride_wt,
               stride_wk, out.stride(0), K=k, WEIGHTED=weights is not None, BLOCK=block, num_warps=warps)
    return out
