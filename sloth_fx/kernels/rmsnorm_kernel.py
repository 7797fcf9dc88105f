"""The Triton side of the fused RMSNorm: one kernel forward, one backward, their tiling and launch
(:mod:`sloth_fx.kernels.rmsnorm` holds the maths, HF's reference, the autograd Function and the op).

Per row ``x`` of length ``N``, in fp32, with ``w' = w + weight_offset``::

    forward:   r = 1 / sqrt(mean(x ** 2) + eps),   n = x * r,   y = w' * round(n)
    backward:  g = dy * w',   dx = r * (g - n * mean(g * n)),   dw = sum over rows of dy * round(n)

``round`` is the rounding to ``normed_dtype`` and back (the identity when it is None); dx treats it
as the identity, as autograd does for ``.to()``. The forward saves nothing itself: it returns ``y``
and the per-row fp32 ``r`` ("rstd"), which with ``x`` is all the backward reads (n is recomputed).

``dw`` is summed in two stages as in the Triton layer-norm tutorial: each backward program owns a
contiguous block of rows and writes the fp32 sum of its rows into its own row of a
``[num_partials, N]`` buffer (no atomics), then one reduction over that buffer gives ``dw``.

:mod:`~sloth_fx.kernels.add_rmsnorm` builds its forward kernel from the same rounding, tiling and
row views, and its backward is :func:`rmsnorm_backward`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch
from .toolkit import cdiv, multi_processor_count, next_power_of_2

__all__ = ["rmsnorm_forward", "rmsnorm_backward"]

# A row whose next power of two fits in this many bytes (of x's dtype) is held in registers as one
# tile: 64 KiB is 16384 fp32 / 32768 fp16 elements, the largest hidden sizes of current decoder
# models, and still compiles to a kernel without register spills at 8 warps. Longer rows are
# walked in tiles of this size (two passes over the row in forward, two in backward).
_MAX_TILE_BYTES = 65536

# Codes for the constexpr ROUND argument of the kernels (which dtype n is rounded to).
_ROUND_NONE, _ROUND_FP16, _ROUND_BF16 = 0, 1, 2
_ROUND_CODES = {None: _ROUND_NONE, torch.float32: _ROUND_NONE, torch.float16: _ROUND_FP16,
                torch.bfloat16: _ROUND_BF16}


# --------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _round_to(n, ROUND: tl.constexpr):
    """Round fp32 ``n`` to fp16 (ROUND == _ROUND_FP16 == 1) or bf16 (ROUND == _ROUND_BF16 == 2)
    and back, round to nearest even as torch's ``.to()``; ROUND == 0 leaves ``n`` as it is."""
    if ROUND == 1:
        n = n.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        n = n.to(tl.bfloat16).to(tl.float32)
    return n


@triton.jit
def _rmsnorm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y,
    N, eps, offset,
    HAS_OFFSET: tl.constexpr, ROUND: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """One program per row: y = (w + offset) * round(x * r), r stored to RSTD[row]."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = w + offset
        y = w * _round_to(x * rstd, ROUND)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                w = w + offset
            y = w * _round_to(x * rstd, ROUND)
            tl.store(y_row + c, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit(do_not_specialize=["M", "rows_per_program"])  # token counts (kernels.toolkit)
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PART,
    stride_dy, stride_x, stride_dx,
    M, N, rows_per_program, offset,
    HAS_OFFSET: tl.constexpr, ROUND: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    """Program p walks rows [p*rows_per_program, ...): writes dx per row, and the fp32 sum over
    its rows of dy * round(n) into DW_PART[p, :]."""
    pid = tl.program_id(0).to(tl.int64)
    # int64 bounds make the loop's row index int64, so row * stride cannot overflow past 2**31.
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    dw_row = DW_PART + pid * N
    cols = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = w + offset
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            n = x * rstd
            if COMPUTE_DX:
                g = dy * w
                mean_gn = tl.sum(g * n, axis=0) / N
                dx = (g - n * mean_gn) * rstd
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * _round_to(n, ROUND)
        if COMPUTE_DW:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            x_row = X + row * stride_x
            dy_row = DY + row * stride_dy
            rstd = tl.load(RSTD + row)
            if COMPUTE_DX:
                acc = tl.zeros([BLOCK], dtype=tl.float32)
                for start in range(0, N, BLOCK):
                    c = start + cols
                    mask = c < N
                    x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                    if HAS_OFFSET:
                        w = w + offset
                    acc += dy * w * (x * rstd)
                mean_gn = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK):
                c = start + cols
                mask = c < N
                x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_row + c, mask=mask, other=0.0).to(tl.float32)
                n = x * rstd
                if COMPUTE_DX:
                    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                    if HAS_OFFSET:
                        w = w + offset
                    g = dy * w
                    dx = (g - n * mean_gn) * rstd
                    tl.store(DX + row * stride_dx + c, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    # This program owns its partial row: its first row overwrites it (the load
                    # is masked off, reading 0), later rows add to it. No atomics, no zero-fill.
                    n_prev = tl.where(row > row_start, N, 0)
                    prev = tl.load(dw_row + c, mask=c < n_prev, other=0.0)
                    tl.store(dw_row + c, prev + dy * _round_to(n, ROUND), mask=mask)


# --------------------------------------------------------------------------------------------
# Tiling and launch


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Allocate a buffer that a kernel fully overwrites (tests patch this to pre-fill NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: Tensor) -> Tensor:
    """View ``t`` as [rows, N] with unit column stride; the row stride is passed to the kernels.

    A last dim with stride != 1 is copied with ``.contiguous()`` (the kernels load a row as one
    contiguous vector); leading dims that cannot be flattened without a copy are copied by reshape.
    """
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _block_config(n: int, elem_size: int) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_TILE, num_warps) for rows of n elements of elem_size bytes."""
    return _tiles(n, elem_size, _MAX_TILE_BYTES)


@lru_cache(maxsize=None)
def _tiles(n: int, elem_size: int, max_tile_bytes: int) -> tuple[int, bool, int]:
    # The tile limit is an argument so that tests which lower it get entries of their own.
    max_block = max(1, max_tile_bytes // elem_size)
    block = min(next_power_of_2(n), max_block)
    # ~256 elements per warp (8 fp32 values per thread and per live array, as in the Triton
    # layer-norm tutorial); up to 16 warps so that 8K-16K rows do not spill registers.
    num_warps = min(max(block // 256, 1), 16)
    return block, block >= n, num_warps


def _programs_in_flight(device: torch.device) -> int:
    """How many backward programs (= dw partial rows) to aim for on a device."""
    if device.type == "cuda":
        # A few resident programs per SM keep every SM busy; more would only grow the partial
        # buffer (and the final reduction) without adding parallelism.
        return 4 * multi_processor_count(device)
    # The interpreter runs programs one after another: a few programs (each over several rows)
    # exercise the same code paths as the GPU.
    return 4


class _BackwardGrid(NamedTuple):
    rows_per_program: int
    programs: int  # = dw partial rows; every program gets >= 1 row


@lru_cache(maxsize=4096)
def _backward_grid(m: int, device: torch.device) -> _BackwardGrid:
    """How the backward splits m > 0 rows between programs: decided once per (rows, device)."""
    rows_per_program = cdiv(m, min(m, _programs_in_flight(device)))
    return _BackwardGrid(rows_per_program, cdiv(m, rows_per_program))


def rmsnorm_forward(x: Tensor, weight: Tensor, eps: float, weight_offset: float,
                    normed_dtype: torch.dtype | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(y, rstd)``: the forward kernel over x's rows, one program per row. ``y`` in ``out_dtype``
    and x's shape; ``rstd`` the per-row fp32 ``r``, ``[x.numel() / N]``. Inputs are not validated."""
    n = x.shape[-1]
    x2 = _as_rows(x)
    m = x2.shape[0]
    y = _empty((m, n), out_dtype, x.device)
    rstd = _empty((m,), torch.float32, x.device)
    if m > 0:
        block, single, num_warps = _block_config(n, x.element_size())
        launch(
            _rmsnorm_fwd_kernel, (m,),
            x2, weight.contiguous(), y, rstd,
            x2.stride(0), y.stride(0),
            n, float(eps), float(weight_offset),
            HAS_OFFSET=weight_offset != 0.0, ROUND=_ROUND_CODES[normed_dtype],
            BLOCK=block, SINGLE_TILE=single, num_warps=num_warps,
        )
    return y.view(x.shape), rstd


def rmsnorm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, weight_offset: float,
                     normed_dtype: torch.dtype | None, *, need_dx: bool, need_dw: bool
                     ) -> tuple[Tensor | None, Tensor | None]:
    """``(dx, dw)`` of RMSNorm (the module docstring's formulas) from the forward's ``x`` and per-row
    fp32 ``rstd``: ``dx`` in x.dtype and x's shape, ``dw`` in weight.dtype; each None when not asked
    for. Also the backward of every op that normalises as this one does (``add_rmsnorm``'s)."""
    if not (need_dx or need_dw):
        return None, None
    n = x.shape[-1]
    x2 = _as_rows(x)
    dy2 = _as_rows(dy)
    w = weight.contiguous()
    m = x2.shape[0]
    dx = _empty((m, n), x.dtype, x.device) if need_dx else None
    dw = None
    if m == 0:
        if need_dw:
            dw = torch.zeros_like(weight)
        return (dx.view(x.shape) if need_dx else None), dw

    rows_per_program, num_partials = _backward_grid(m, x.device)
    dw_part = _empty((num_partials, n), torch.float32, x.device) if need_dw else None
    block, single, num_warps = _block_config(n, x.element_size())
    # Pointers of buffers a constexpr flag switches off are never dereferenced.
    dx_arg = dx if need_dx else x2
    dw_arg = dw_part if need_dw else rstd
    launch(
        _rmsnorm_bwd_kernel, (num_partials,),
        dy2, x2, w, rstd, dx_arg, dw_arg,
        dy2.stride(0), x2.stride(0), dx_arg.stride(0),
        m, n, rows_per_program, weight_offset,
        HAS_OFFSET=weight_offset != 0.0, ROUND=_ROUND_CODES[normed_dtype],
        BLOCK=block, SINGLE_TILE=single,
        COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, num_warps=num_warps,
    )
    if need_dw:
        # Second stage of the dw reduction: sum the per-program partial rows (fp32).
        dw = dw_part.sum(dim=0).to(weight.dtype)
    return (dx.view(x.shape) if need_dx else None), dw
