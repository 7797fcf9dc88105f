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
normalised row is recomputed in backward. The Triton kernels, their tiling and launch, and the
two-stage ``dw`` sum are :mod:`~sloth_fx.kernels.rmsnorm_kernel`'s (``rmsnorm_forward``,
``rmsnorm_backward``); ``rmsnorm_backward`` is exported from here too, as the backward of every op
that normalises as this one does.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .rmsnorm_kernel import rmsnorm_backward, rmsnorm_forward
from .toolkit import SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, dtype_names, refusal, use_triton, validate

__all__ = ["rmsnorm", "rmsnorm_backward", "rmsnorm_reference", "rmsnorm_supports", "RMSNormFunction"]


def rmsnorm_reference(x: Tensor, weight: Tensor, eps: float, *, weight_offset: float = 0.0,
                      normed_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm in plain PyTorch, with exactly Hugging Face's casts and roundings.

    ``r = rsqrt(mean(x_f32**2, -1) + eps)``; ``n = x_f32 * r``, rounded to ``normed_dtype`` when
    given; ``y = (weight + weight_offset) * n`` with the product taken in fp32 (one rounding, to
    ``out_dtype``, which defaults to ``promote_types(x.dtype, weight.dtype)``).

    With ``normed_dtype=x.dtype`` this is bitwise ``LlamaRMSNorm``; with ``weight_offset=1.0,
    out_dtype=x.dtype`` it is bitwise ``GemmaRMSNorm``. A float64 ``x`` is computed in float64
    (for tests); everything else in float32. The pass's patterns are HF's own spellings
    (``sloth_fx/passes/rmsnorm.py``), not traced from this function.
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
    per-row fp32 ``rstd`` (``x.numel() / N`` floats). Inputs are not validated here. Both launches
    are :mod:`~sloth_fx.kernels.rmsnorm_kernel`'s.
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
        y, rstd = rmsnorm_forward(x, weight, eps, weight_offset, normed_dtype, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.weight_offset = float(weight_offset)
        ctx.normed_dtype = normed_dtype
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy, x, weight, rstd, ctx.weight_offset, ctx.normed_dtype,
                                  need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None


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
