"""The Triton side of the fused RoPE: one launch rotates q and k together, forward or backward
(:mod:`sloth_fx.kernels.rope` holds the maths, the op and its autograd Function).

The kernel computes ``y1 = x1*c1 - x2*s1``, ``y2 = x2*c2 + x1*s2`` on the halves of the first
``R = cos.shape[-1]`` features and copies ``y[R:] = x[R:]``. The backward is the forward with
``(s1, s2)`` replaced by ``(-s2, -s1)``: one kernel serves both directions (constexpr
``BACKWARD``). Arithmetic is fp32; each output is rounded once to its tensor's dtype.

Layout: the launch grid is one program per token (B*S programs); each program loads its token's
cos/sin once and loops over q's heads then k's heads (two pointer sets) in tiles of ``BLOCK_H``
heads. This reads cos/sin once per token rather than once per head block, and B*S (e.g. 16384 in
training) programs are plenty to fill the GPU. q/k are read through their strides (the
``view(B, S, H, D).transpose(1, 2)`` views of the projection outputs are not copied).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import launch
from .toolkit import next_power_of_2

__all__ = ["empty_bhsd", "rotate_into"]

# Upper bound on the elements of one [BLOCK_H, BLOCK_HALF] tile. The kernel holds two such tiles
# (the two halves) of fp32 values plus their results in registers; 2048 elements over the default
# 4 warps (128 threads) is 16 fp32 values per thread per tile, which leaves the register file
# room without spilling for head_dim up to 256 (BLOCK_HALF 128 -> 16 heads per step).
_MAX_TILE = 2048


@triton.jit
def _rope_one_tensor(x_row_ptr, y_row_ptr, H, x_stride_h, x_stride_d, y_stride_h, y_stride_d, c1, c2, s1, s2, HALF, D,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """Rotate all H heads of one token of one tensor: y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2.

    ``x_row_ptr``/``y_row_ptr`` point at head 0, feature 0 of this token. c1/c2/s1/s2 are fp32
    [BLOCK_HALF] vectors (already negated/swapped by the caller for the backward).
    """
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < H)[:, None] & mask_d[None, :]
        x1_ptrs = x_row_ptr + offs_h[:, None] * x_stride_h + offs_d[None, :] * x_stride_d
        y1_ptrs = y_row_ptr + offs_h[:, None] * y_stride_h + offs_d[None, :] * y_stride_d
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF * x_stride_d, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c1[None, :] - x2 * s1[None, :]
        y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(y1_ptrs, y1.to(y_row_ptr.dtype.element_ty), mask=mask)
        tl.store(y1_ptrs + HALF * y_stride_d, y2.to(y_row_ptr.dtype.element_ty), mask=mask)
        if BLOCK_TAIL > 0:
            # Partial rotary: features [2*HALF, D) pass through (copied, value-exact).
            offs_t = 2 * HALF + tl.arange(0, BLOCK_TAIL)
            mask_t = (offs_h < H)[:, None] & (offs_t < D)[None, :]
            xt = tl.load(
                x_row_ptr + offs_h[:, None] * x_stride_h + offs_t[None, :] * x_stride_d,
                mask=mask_t,
                other=0.0,
            )
            tl.store(
                y_row_ptr + offs_h[:, None] * y_stride_h + offs_t[None, :] * y_stride_d,
                xt.to(y_row_ptr.dtype.element_ty),
                mask=mask_t,
            )


@triton.jit(do_not_specialize=["S"])  # the token count (kernels.toolkit)
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,
    S, HQ, HK, HALF, D,
    q_sb, q_ss, q_sh, q_sd,
    k_sb, k_ss, k_sh, k_sd,
    qo_sb, qo_ss, qo_sh, qo_sd,
    ko_sb, ko_ss, ko_sh, ko_sd,
    c_sb, c_ss, c_sd,
    s_sb, s_ss, s_sd,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    """One program per token (b, s): load cos/sin once, rotate every q head then every k head.

    Forward: (q, k) -> (q_embed, k_embed). Backward: (dq_embed, dk_embed) -> (dq, dk), which is
    the forward with (s1, s2) replaced by (-s2, -s1). All strides are element strides of the
    [B, S, H, D]-indexed views; row offsets are formed in int64 so that tensors past 2^31
    elements address correctly.
    """
    row = tl.program_id(0)
    b = (row // S).to(tl.int64)
    s = (row % S).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos_row = cos_ptr + b * c_sb + s * c_ss
    sin_row = sin_ptr + b * s_sb + s * s_ss
    c1 = tl.load(cos_row + offs_d * c_sd, mask=mask_d, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + (offs_d + HALF) * c_sd, mask=mask_d, other=0.0).to(tl.float32)
    if BACKWARD:
        s1 = -tl.load(sin_row + (offs_d + HALF) * s_sd, mask=mask_d, other=0.0).to(tl.float32)
        s2 = -tl.load(sin_row + offs_d * s_sd, mask=mask_d, other=0.0).to(tl.float32)
    else:
        s1 = tl.load(sin_row + offs_d * s_sd, mask=mask_d, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + (offs_d + HALF) * s_sd, mask=mask_d, other=0.0).to(tl.float32)

    _rope_one_tensor(
        q_ptr + b * q_sb + s * q_ss, qo_ptr + b * qo_sb + s * qo_ss, HQ, q_sh, q_sd, qo_sh, qo_sd,
        c1, c2, s1, s2, HALF, D, BLOCK_HQ, BLOCK_HALF, BLOCK_TAIL,
    )
    _rope_one_tensor(
        k_ptr + b * k_sb + s * k_ss, ko_ptr + b * ko_sb + s * ko_ss, HK, k_sh, k_sd, ko_sh, ko_sd,
        c1, c2, s1, s2, HALF, D, BLOCK_HK, BLOCK_HALF, BLOCK_TAIL,
    )


def _bshd_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a [B, H, S, D] tensor in (batch, seq, head, dim) order."""
    sb, sh, ss, sd = x.stride()
    return sb, ss, sh, sd


def _table_strides(t: torch.Tensor, bsz: int, seq: int) -> tuple[int, int, int]:
    """Strides of ``t.expand(bsz, seq, R)`` without making the view: 0 where a size 1 broadcasts."""
    (tb, ts, _), (sb, ss, sd) = t.shape, t.stride()
    return (0 if tb != bsz else sb), (0 if ts != seq else ss), sd


def empty_bhsd(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new [B, H, S, D] tensor laid out as [B, S, H, D] in memory (the transposed view).

    This is the layout HF's own ``q * cos + ...`` produces from the transposed projection view
    (elementwise ops keep their input's layout), so attention sees the same strides either way.
    """
    b, h, s, d = shape
    return torch.empty_strided((b, h, s, d), (s * h * d, d, h * d, 1), dtype=dtype, device=device)


class _Blocks(NamedTuple):
    half: int
    block_half: int
    block_tail: int
    block_hq: int
    block_hk: int


@lru_cache(maxsize=None)
def _blocks(hq: int, hk: int, head_dim: int, rotary_dim: int) -> _Blocks:
    """The kernel's tile sizes for a head layout: decided once per (heads, head_dim, rotary_dim)."""
    half = rotary_dim // 2
    block_half = next_power_of_2(half)
    tail = head_dim - rotary_dim
    heads_per_step = max(1, _MAX_TILE // block_half)
    return _Blocks(half, block_half, next_power_of_2(tail) if tail > 0 else 0,
                   min(next_power_of_2(hq), heads_per_step), min(next_power_of_2(hk), heads_per_step))


def rotate_into(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    backward: bool,
) -> None:
    """Launch the rotation kernel once for q and k together, writing into q_out/k_out.

    q/k/q_out/k_out: [B, H, S, D] with any strides; cos/sin: [B, S, R] or broadcastable to it
    (size 1 in batch or sequence), any strides. ``backward=True`` applies the transpose.
    """
    bsz, hq, seq, head_dim = q.shape
    if bsz * seq == 0:
        return  # nothing to rotate; a zero-size grid is not a valid launch on CUDA
    blocks = _blocks(hq, k.shape[1], head_dim, cos.shape[-1])
    launch(
        _rope_kernel, (bsz * seq,),
        q, k, cos, sin, q_out, k_out,
        seq, hq, k.shape[1], blocks.half, head_dim,
        *_bshd_strides(q), *_bshd_strides(k), *_bshd_strides(q_out), *_bshd_strides(k_out),
        *_table_strides(cos, bsz, seq), *_table_strides(sin, bsz, seq),
        BLOCK_HQ=blocks.block_hq,
        BLOCK_HK=blocks.block_hk,
        BLOCK_HALF=blocks.block_half,
        BLOCK_TAIL=blocks.block_tail,
        BACKWARD=backward,
    )
