"""Fused RMSNorm: one Triton kernel forward, one backward (dx and per-program dw partials).

The op, for a row ``x`` of length ``N`` (rows are all leading dims flattened), in fp32 throughout::

    r = 1 / sqrt(mean(x_f32 ** 2) + eps)              # one fp32 scalar per row ("rstd")
    n = x_f32 * r                                      # the normalised row
    n = n.to(normed_dtype).to(float32)                 # only when normed_dtype is given
    y = (w_f32 + weight_offset) * n                    # then stored in out_dtype

``out_dtype`` defaults to ``torch.promote_types(x.dtype, weight.dtype)``.

The two spellings found in Hugging Face models:

* Llama / Mistral (``LlamaRMSNorm``): ``weight * (x_f32 * r).to(x.dtype)``, i.e.
  ``normed_dtype=x.dtype``, ``weight_offset=0``, default ``out_dtype``. The normalised value is
  rounded to x's dtype before the multiply; QLoRA keeps the weight in fp32, so a bf16 ``x`` gives an
  fp32 output.
* Gemma (``GemmaRMSNorm``): ``((x_f32 * r) * (1.0 + weight.float())).type_as(x)``, i.e.
  ``normed_dtype=None``, ``weight_offset=1.0``, ``out_dtype=x.dtype``.

Backward (hand-derived; ``w' = w_f32 + weight_offset``, all in fp32)::

    g  = dy * w'
    dx = r * (g - n * mean(g * n))        # n = x * r unrounded: the rounding to normed_dtype is
                                          # treated as the identity, as autograd does for .to()
    dw = sum over rows of dy * n_r        # n_r = n rounded to normed_dtype as in forward

Derivation of dx: ``dn_j/dx_i = r * delta_ij - x_i * x_j * r**3 / N``, so
``dx_i = sum_j g_j dn_j/dx_i = r * g_i - n_i * r * sum_j(g_j * n_j) / N``.

Forward saves only ``x`` (the caller's tensor, no copy) and the per-row fp32 ``rstd``; the
normalised row is recomputed in backward. ``dw`` is summed in two stages as in the Triton
layer-norm tutorial: each backward program owns a contiguous block of rows and writes the fp32
sum of its rows into its own row of a ``[num_partials, N]`` buffer (no atomics), then one
reduction over that buffer gives ``dw``.
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .toolkit import (
    SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, cdiv, device_guard, dtype_names, multi_processor_count,
    next_power_of_2, refusal, use_triton, validate,
)

__all__ = ["rmsnorm", "rmsnorm_backward", "rmsnorm_reference", "rmsnorm_supports", "RMSNormFunction"]

# A row whose next power of two fits in this many bytes (of x's dtype) is held in registers as one
# tile: 64 KiB is 16384 fp32 / 32768 fp16 elements, the largest hidden sizes of current decoder
# models, and still compiles to a kernel without register spills at 8 warps. Longer rows are
# walked in tiles of this size (two passes over the row in forward, two in backward).
_MAX_TILE_BYTES = 65536

# Codes for the constexpr ROUND argument of the kernels (which dtype n is rounded to).
_ROUND_NONE, _ROUND_FP16, _ROUND_BF16 = 0, 1, 2


def rmsnorm_reference(x: Tensor, weight: Tensor, eps: float, *, weight_offset: float = 0.0,
                      normed_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm in plain PyTorch, with exactly Hugging Face's casts and roundings.

    ``r = rsqrt(mean(x_f32**2, -1) + eps)``; ``n = x_f32 * r``, rounded to ``normed_dtype`` when
    given; ``y = (weight + weight_offset) * n`` with the product taken in fp32 (one rounding, to
    ``out_dtype``, which defaults to ``promote_types(x.dtype, weight.dtype)``).

    With ``normed_dtype=x.dtype`` this is bitwise ``LlamaRMSNorm``; with ``weight_offset=1.0,
    out_dtype=x.dtype`` it is bitwise ``GemmaRMSNorm``. A float64 ``x`` is computed in float64
    (for tests); everything else in float32. The pass's patterns are HF's own spellings
    (``passes/rmsnorm.py``), not traced from this function.
    """
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute_dtype)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if normed_dtype is not None:
        h = h.to(normed_dtype)
    w = weight_offset + weight.to(compute_dtype) if weight_offset != 0.0 else weight
    # HF multiplies in promote_types(w, h). When that is a 16-bit dtype the product of two 16-bit
    # values is exact in fp32, so rounding it once to the same 16-bit out_dtype equals the fp32
    # product rounded; only when out_dtype differs must the product be kept in fp32.
    if torch.promote_types(w.dtype, h.dtype) not in (compute_dtype, out_dtype):
        h = h.to(compute_dtype)
    return (w * h).to(out_dtype)


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


@triton.jit
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
# Launch helpers


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


_ROUND_CODES = {None: _ROUND_NONE, torch.float32: _ROUND_NONE, torch.float16: _ROUND_FP16,
                torch.bfloat16: _ROUND_BF16}


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm with Triton forward and a hand-written Triton backward.

    ``apply(x, weight, eps, weight_offset, normed_dtype, out_dtype)``; ``out_dtype`` must be a
    dtype here (the public ``rmsnorm`` fills in the default). Forward, per row (fp32):
    ``r = 1/sqrt(mean(x^2) + eps)``, ``n = x*r`` (rounded to ``normed_dtype`` when not None),
    ``y = (w + weight_offset) * n`` stored in ``out_dtype``.

    Backward, with ``w' = w + weight_offset``, ``g = dy * w'``:
    ``dx = r * (g - n * mean(g * n))`` (n unrounded) in x.dtype, and
    ``dw = sum_rows(dy * n_rounded)`` in weight.dtype (skipped when weight needs no grad).

    Saves for backward: ``x`` as given (no copy), ``weight`` (a parameter, no copy) and the
    per-row fp32 ``rstd`` (``x.numel() / N`` floats). Inputs are not validated here.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: Tensor,
        eps: float,
        weight_offset: float,
        normed_dtype: torch.dtype | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        n = x.shape[-1]
        x2 = _as_rows(x)
        w = weight.contiguous()
        m = x2.shape[0]
        y = _empty((m, n), out_dtype, x.device)
        rstd = _empty((m,), torch.float32, x.device)
        if m > 0:
            block, single, num_warps = _block_config(n, x.element_size())
            with device_guard(x):
                _rmsnorm_fwd_kernel[(m,)](
                    x2, w, y, rstd,
                    x2.stride(0), y.stride(0),
                    n, float(eps), float(weight_offset),
                    HAS_OFFSET=weight_offset != 0.0, ROUND=_ROUND_CODES[normed_dtype],
                    BLOCK=block, SINGLE_TILE=single, num_warps=num_warps,
                )
        ctx.save_for_backward(x, weight, rstd)
        ctx.weight_offset = float(weight_offset)
        ctx.normed_dtype = normed_dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rstd, ctx.weight_offset, ctx.normed_dtype,
                                  need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None


def rmsnorm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, weight_offset: float,
                     normed_dtype: torch.dtype | None, *, need_dx: bool, need_dw: bool
                     ) -> tuple[Tensor | None, Tensor | None]:
    """``(dx, dw)`` of RMSNorm (the formulas of :class:`RMSNormFunction`) from the forward's ``x``
    and per-row fp32 ``rstd``: ``dx`` in x.dtype and x's shape, ``dw`` in weight.dtype; each None
    when not asked for. Also the backward of every op that normalises as this one does."""
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
    with device_guard(x):
        _rmsnorm_bwd_kernel[(num_partials,)](
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


def _check_dtype(what: str, dtype: torch.dtype | None, allow_none: bool = False) -> None:
    if dtype is None and allow_none:
        return
    if dtype not in SUPPORTED_DTYPES:
        raise UnsupportedType(
            "rmsnorm", f"{what} {dtype} is not one of {dtype_names(SUPPORTED_DTYPES)}{' or None' if allow_none else ''}"
        )


def _check(x: Tensor, weight: Tensor, eps: float, normed_dtype: torch.dtype | None,
           out_dtype: torch.dtype | None) -> None:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise UnsupportedType("rmsnorm", "x and weight must be tensors")
    if x.device != weight.device:
        raise UnsupportedValue("rmsnorm", f"x is on {x.device} but weight is on {weight.device}")
    _check_dtype("x.dtype", x.dtype)
    _check_dtype("weight.dtype", weight.dtype)
    _check_dtype("normed_dtype", normed_dtype, allow_none=True)
    _check_dtype("out_dtype", out_dtype, allow_none=True)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise UnsupportedValue("rmsnorm", f"x needs a non-empty last dim to normalise, got shape {tuple(x.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise UnsupportedValue(
            "rmsnorm", f"weight.shape {tuple(weight.shape)} does not scale the last axis ({x.shape[-1]}) of x"
        )
    if not isinstance(eps, numbers.Real) or not eps >= 0.0:
        raise UnsupportedValue("rmsnorm", f"eps must be a number >= 0, got {eps!r}")


def rmsnorm_supports(x: Tensor, weight: Tensor, eps: float, *, normed_dtype: torch.dtype | None = None,
                     out_dtype: torch.dtype | None = None) -> str | None:
    """None when :func:`rmsnorm` takes these arguments, else the reason it does not.

    The checks :func:`rmsnorm` raises on (dtypes, shapes, devices, eps), answered instead of
    raised; they read no tensor's values, so fake tensors (an fx node's example value) do.
    """
    return refusal(_check, x, weight, eps, normed_dtype, out_dtype)


def _signature(x: Tensor, weight: Tensor, eps: float, normed_dtype: torch.dtype | None,
               out_dtype: torch.dtype | None) -> tuple:
    """Everything :func:`_check` reads but the token count (ragged batches add no entries)."""
    return (type(x), type(weight), x.device, weight.device, x.dtype, weight.dtype, normed_dtype, out_dtype,
            x.shape[-1:], weight.shape, type(eps), eps)


# Argument signatures that passed _check.
_VALID: set[tuple] = set()


def rmsnorm(x: Tensor, weight: Tensor, eps: float, *, weight_offset: float = 0.0,
            normed_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm over the last dim of ``x`` (see the module docstring for the exact maths).

    Runs ``RMSNormFunction`` (Triton forward and backward) when ``use_triton(x, weight)``, else
    ``rmsnorm_reference``; both give HF's result (Llama: ``normed_dtype=x.dtype``; Gemma:
    ``weight_offset=1.0, out_dtype=x.dtype``).

    Raises ``TypeError`` for x / weight / normed_dtype / out_dtype outside fp32/fp16/bf16, and
    ``ValueError`` for a 0-dim or zero-width x, ``weight.shape != (x.shape[-1],)``, x and weight
    on different devices, or an eps that is not a number >= 0 (:func:`rmsnorm_supports` answers
    the same questions without raising).
    """
    validate(_VALID, _signature, _check, x, weight, eps, normed_dtype, out_dtype)
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), float(weight_offset), normed_dtype, out_dtype)
    return rmsnorm_reference(
        x, weight, eps, weight_offset=weight_offset, normed_dtype=normed_dtype, out_dtype=out_dtype
    )
