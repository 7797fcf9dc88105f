"""The loss of rows of logits and its gradient, written over the logits: the Triton side of the
fused lm_head + cross-entropy (:mod:`sloth_fx.kernels.cross_entropy_chunks` makes the logits chunk
by chunk and takes the gradient on through the matmuls).

For a row ``x`` of pre-cap logits (model dtype, read as fp32), ``z = cap * tanh(x / cap)`` with a
soft-cap (``z = x`` without), its label ``y`` and the fp32 factor ``s`` (``1/n_valid`` for the
mean, ``1/num_items_in_batch`` for the sum)::

    lse  = log sum_j exp(z_j)                      online max and sum over vocab blocks
    loss = lse - z_y                               0 where y == ignore_index
    dx_j = (softmax(z)_j - [j == y]) * s  (* (1 - tanh^2(x_j / cap)) with a cap)
                                                   0 on ignored rows; rounded once to the model dtype

One Triton program a row reads it once for ``lse`` and once more for ``dx``, which it writes in
place: no other buffer the width of the vocabulary. ``s`` is read on the device (no sync).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch
from .toolkit import cdiv, next_power_of_2, tanh

__all__ = ["rows_loss_and_grad_", "scale_"]


@triton.jit
def _rows_kernel(
    logits_ptr,  # [rows, V] model dtype, contiguous rows; overwritten with d loss / d logits
    stride_row,
    labels_ptr,  # [rows] int64
    loss_ptr,  # [rows] fp32: per-row loss lse - z[label], 0 where ignored
    scale_ptr,  # [1] fp32: 1/n_valid (mean) or 1/num_items_in_batch (sum); read on device, no sync
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row  # int64: rows * V can pass 2^31
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online log-sum-exp over vocab blocks, in fp32.
    m = -float("inf")  # running max
    s = 0.0  # running sum of exp(z - m)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * tanh(z / softcap)
        z = tl.where(mask, z, -float("inf"))  # after the cap: tanh(-inf) would be -1, not -inf
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    # z[label]: masked so that an ignored or out-of-range label never reads memory. On CUDA the range
    # check is an asynchronous device assert: this kernel may run on an out-of-range label before it fires.
    in_range = valid & (label >= 0) & (label < n_cols)
    safe_label = tl.where(in_range, label, 0)
    z_label = tl.load(row_ptr + safe_label, mask=in_range, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * tanh(z_label / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: d loss / d x_j = (softmax(z)_j - [j == label]) * scale (* (1 - tanh^2) with a cap),
        # 0 on ignored rows; written over the logits row in the model dtype.
        scale = tl.load(scale_ptr)
        row_scale = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = tanh(x / softcap)
                z = softcap * t
            else:
                z = x
            g = tl.exp(z - lse) - tl.where(offs == label, 1.0, 0.0)
            g = g * row_scale
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = tl.where(valid, g, 0.0)  # exact zeros on ignored rows, even if scale is inf (n_valid = 0)
            tl.store(row_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=None)
def _row_tiles(vocab: int, max_block_v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) of the row kernel, once per vocabulary (and block cap, which tests lower)."""
    block_v = min(next_power_of_2(vocab), max_block_v)
    # About 16 fp32 values per thread per block (see cross_entropy._MAX_BLOCK_V), between 1 and 8 warps.
    return block_v, max(1, min(8, block_v // (32 * 16)))


@triton.jit
def _scale_kernel(t_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """t = t * g in place on one flat tile: fp32 product, one rounding to t's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(t_ptr + offs, (t * tl.load(g_ptr)).to(t_ptr.dtype.element_ty), mask=mask)


_SCALE_BLOCK = 1024  # 8 elements a thread over 4 warps, as the gated-MLP kernels


def rows_loss_and_grad_(logits: Tensor, labels: Tensor, loss: Tensor, scale: Tensor, *, ignore_index: int,
                        logit_softcap: float | None, compute_grad: bool, max_block_v: int) -> None:
    """``loss[i]`` for each row ``i`` of ``logits`` and, with ``compute_grad``, the row overwritten
    with ``d loss / d logits`` (module doc), in one launch.

    ``logits [R, V]`` in the model dtype with unit column stride, ``labels [R]`` int64 (an
    out-of-range label that is not ``ignore_index`` never reads memory, and its row's loss and
    gradient are meaningless: the caller checks the range, on CUDA without waiting for the answer),
    ``loss [R]`` fp32, ``scale [1]`` fp32. ``max_block_v`` caps the vocabulary block.
    """
    block_v, num_warps = _row_tiles(logits.shape[1], max_block_v)
    launch(
        _rows_kernel, (logits.shape[0],),
        logits, logits.stride(0), labels, loss, scale, logits.shape[1], ignore_index,
        float(logit_softcap) if logit_softcap is not None else 1.0,
        HAS_SOFTCAP=logit_softcap is not None, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=num_warps,
    )


def scale_(t: Tensor, g: Tensor) -> Tensor:
    """t * g in place, with t contiguous and g an fp32 one-element tensor, computed in fp32 and
    rounded once to t's dtype: one launch, and no fp32 copy of a whole [N, H] gradient."""
    if t.dtype == torch.float32:
        return t.mul_(g)
    n = t.numel()
    if n:
        launch(_scale_kernel, (cdiv(n, _SCALE_BLOCK),), t, g, n, BLOCK=_SCALE_BLOCK)
    return t
