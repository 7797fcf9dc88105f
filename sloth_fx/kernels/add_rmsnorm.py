"""Residual add fused into the RMSNorm that follows it: one pass over memory forward.

Hugging Face's decoder layer computes ``h = residual + x`` in the model dtype, normalises ``h``
and keeps ``h`` as the next residual. Per row of length ``N`` (all leading dims flattened)::

    h = (x + residual) rounded to x.dtype              # HF's add: one rounding, then stored
    r = 1 / sqrt(mean(h_f32 ** 2) + eps)               # from the rounded h, as HF normalises it
    y = (w + weight_offset) * round_normed(h_f32 * r)  # exactly sloth_fx/kernels/rmsnorm.py's y of h

``add_rmsnorm`` returns ``(y, h)``: the Triton forward reads ``x`` and ``residual`` once and writes
``h`` and ``y`` (the unfused ops read ``x`` and ``residual``, write ``h``, read it back, write
``y``).

Backward, given ``dy`` and ``dh`` (the gradient from ``h``'s other uses, the next residual add)::

    dh_total = dh + dh_norm      # dh_norm: RMSNorm's dx of h, in h's dtype; the sum in h's dtype,
                                 # the two roundings autograd makes when it sums h's gradients
    dx = dresidual = dh_total    # the add passes its gradient to both operands
    dw = RMSNorm's dw            # sum over rows of dy * round_normed(h * r)

``dh_norm`` and ``dw`` are RMSNorm's backward (``rmsnorm_backward``, sloth_fx/kernels/rmsnorm_kernel.py) run
on ``h``. Forward saves ``h`` (its own output, no copy), ``weight`` (a parameter) and the per-row
fp32 ``rstd``; ``x`` and ``residual`` are not kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import launch
from .rmsnorm import _check as _check_rmsnorm, _signature as _rmsnorm_signature, rmsnorm_reference
from .rmsnorm_kernel import _ROUND_CODES, _as_rows, _block_config, _empty, _round_to, rmsnorm_backward
from .toolkit import UnsupportedType, UnsupportedValue, refusal, use_triton, validate

__all__ = ["add_rmsnorm", "add_rmsnorm_reference", "add_rmsnorm_supports", "AddRMSNormFunction"]


def add_rmsnorm_reference(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *, weight_offset: float = 0.0,
                          normed_dtype: torch.dtype | None = None,
                          out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(rmsnorm_reference(h, ...), h)`` with ``h = x + residual``: bitwise HF in the model dtype;
    float64 inputs compute in float64 throughout (the tests' exact maths)."""
    h = x + residual
    return rmsnorm_reference(h, weight, eps, weight_offset=weight_offset, normed_dtype=normed_dtype,
                             out_dtype=out_dtype), h


@triton.jit
def _add_rounded(X_row, R_row, c, mask, H_TYPE: tl.constexpr):
    """``x + residual`` at columns ``c``, rounded to the dtype ``h`` is stored in, back in fp32."""
    x = tl.load(X_row + c, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R_row + c, mask=mask, other=0.0).to(tl.float32)
    return (x + r).to(H_TYPE).to(tl.float32)


@triton.jit
def _add_rmsnorm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    N, eps, offset,
    HAS_OFFSET: tl.constexpr, ROUND: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """One program per row: h = round(x + residual) stored to H, then y as RMSNorm's kernel."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    x_row, r_row = X + row * stride_x, R + row * stride_r
    y_row, h_row = Y + row * stride_y, H + row * stride_h
    cols = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        mask = cols < N
        h = _add_rounded(x_row, r_row, cols, mask, H.dtype.element_ty)
        tl.store(h_row + cols, h.to(H.dtype.element_ty), mask=mask)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = w + offset
        tl.store(y_row + cols, (w * _round_to(h * rstd, ROUND)).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            h = _add_rounded(x_row, r_row, c, c < N, H.dtype.element_ty)
            tl.store(h_row + c, h.to(H.dtype.element_ty), mask=c < N)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            # h is recomputed, not read back from H: no ordering of this program's own stores needed
            h = _add_rounded(x_row, r_row, c, mask, H.dtype.element_ty)
            w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                w = w + offset
            tl.store(y_row + c, (w * _round_to(h * rstd, ROUND)).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


class AddRMSNormFunction(torch.autograd.Function):
    """``apply(x, residual, weight, eps, weight_offset, normed_dtype, out_dtype) -> (y, h)`` with
    Triton forward and RMSNorm's Triton backward (module docstring); ``out_dtype`` must be a dtype
    here. Inputs are not validated here."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_offset: float,
                normed_dtype: torch.dtype | None, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        n = x.shape[-1]
        x2, r2 = _as_rows(x), _as_rows(residual)
        m = x2.shape[0]
        y = _empty((m, n), out_dtype, x.device)
        h = _empty((m, n), x.dtype, x.device)
        rstd = _empty((m,), torch.float32, x.device)
        if m > 0:
            block, single, num_warps = _block_config(n, x.element_size())
            launch(
                _add_rmsnorm_fwd_kernel, (m,),
                x2, r2, weight.contiguous(), y, h, rstd,
                x2.stride(0), r2.stride(0), y.stride(0), h.stride(0),
                n, float(eps), float(weight_offset),
                HAS_OFFSET=weight_offset != 0.0, ROUND=_ROUND_CODES[normed_dtype],
                BLOCK=block, SINGLE_TILE=single, num_warps=num_warps,
            )
        h = h.view(x.shape)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            ctx.mark_non_differentiable(h)  # h is x + residual: no gradient through the weight
        ctx.save_for_backward(h, weight, rstd)
        ctx.weight_offset, ctx.normed_dtype = float(weight_offset), normed_dtype
        return y.view(x.shape), h

    @staticmethod
    def backward(ctx, dy: Tensor, dh: Tensor):
        h, weight, rstd = ctx.saved_tensors
        need_x, need_residual, need_dw = ctx.needs_input_grad[:3]
        dh_norm, dw = rmsnorm_backward(dy, h, weight, rstd, ctx.weight_offset, ctx.normed_dtype,
                                       need_dx=need_x or need_residual, need_dw=need_dw)
        dh_total = dh_norm + dh if dh_norm is not None else None
        return (dh_total if need_x else None), (dh_total if need_residual else None), dw, None, None, None, None


def _check(x: Tensor, residual: Tensor, weight: Tensor, eps: float, normed_dtype: torch.dtype | None,
           out_dtype: torch.dtype | None) -> None:
    _check_rmsnorm(x, weight, eps, normed_dtype, out_dtype)
    if not isinstance(residual, Tensor):
        raise UnsupportedType("add_rmsnorm", "residual must be a tensor")
    if residual.dtype != x.dtype:
        raise UnsupportedType("add_rmsnorm", f"adds {residual.dtype} to {x.dtype}: the sum would be promoted")
    if residual.device != x.device:
        raise UnsupportedValue("add_rmsnorm", f"residual is on {residual.device} but x is on {x.device}")
    if residual.shape != x.shape:
        raise UnsupportedValue("add_rmsnorm", f"residual shape {tuple(residual.shape)} is not x's "
                               f"{tuple(x.shape)}: the add would broadcast")


def add_rmsnorm_supports(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *,
                         normed_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> str | None:
    """None when :func:`add_rmsnorm` takes these arguments, else the reason it does not: what
    :func:`rmsnorm_supports` asks of ``x``, and a ``residual`` of x's shape, dtype and device.
    Reads no tensor's values, so fake tensors do."""
    return refusal(_check, x, residual, weight, eps, normed_dtype, out_dtype)


def _signature(x: Tensor, residual: Tensor, weight: Tensor, eps: float, normed_dtype: torch.dtype | None,
               out_dtype: torch.dtype | None) -> tuple:
    return (*_rmsnorm_signature(x, weight, eps, normed_dtype, out_dtype),
            type(residual), residual.dtype, residual.device, residual.shape == x.shape)


_VALID: set[tuple] = set()  # argument signatures that passed _check


def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, *, weight_offset: float = 0.0,
                normed_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``(rmsnorm(h, weight, eps, ...), h)`` with ``h = x + residual`` in x's dtype (module docstring).

    The keyword arguments are :func:`~sloth_fx.kernels.rmsnorm.rmsnorm`'s. Runs
    ``AddRMSNormFunction`` when ``use_triton(x, residual, weight)``, else
    :func:`add_rmsnorm_reference`. Raises ``TypeError`` / ``ValueError`` where
    :func:`add_rmsnorm_supports` gives a reason.
    """
    validate(_VALID, _signature, _check, x, residual, weight, eps, normed_dtype, out_dtype)
    if out_dtype is None:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if use_triton(x, residual, weight):
        return AddRMSNormFunction.apply(x, residual, weight, float(eps), float(weight_offset), normed_dtype, out_dtype)
    return add_rmsnorm_reference(x, residual, weight, eps, weight_offset=weight_offset, normed_dtype=normed_dtype,
                                 out_dtype=out_dtype)
