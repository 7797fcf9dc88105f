"""LoRA's thin products inside the base GEMMs: the "stacked" form of :mod:`~sloth_fx.kernels.lora_plan`.

For one linear ``y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ`` (``x [T, in]``, ``W [out, in]``, ``A [r, in]``,
``B [out, r]``), with every stacked operand in the compute dtype (x's)::

    forward   [x·Wᵀ + b | xa] = x·[W; A]ᵀ + [b; 0]      one GEMM -> [T, out + r], each part rounded
              y = copy of the first out columns;   y += s·xa·Bᵀ   (lowrank_mm: fp32 sum, rounded once)
              xa widened into the caller's fp32 buffer (saved for dB; exact)
    dX        [dX | dY·B] (+)= dY·[W | B]                one GEMM -> [T, in + r]; siblings accumulate
              g = s·dY·B, widened into the caller's fp32 g (dA and the caller's dX += g·A use it)

so ``x·Aᵀ`` and ``dY·B`` are computed by the GEMM that reads ``x`` and ``dY`` anyway, instead of
by a separate product that reads them again. Both are rounded to the compute dtype, as PEFT's
``F.linear(x, A)`` rounds them when the adapters are in that dtype (the plan stacks fp32 adapters
only when told to: :func:`~sloth_fx.kernels.lora_plan.lora_plan`).

Why ``y`` is copied and ``dX`` is not: the GEMM writes ``[T, out + r]`` rows, so its first
``out`` columns are a strided view. An output is handed to the model's own code, which may assume
a contiguous tensor (``view`` merging dims, the gated-MLP op that copies strided inputs) or write
it in place, so ``y`` is a contiguous copy, as every other form gives (``2·T·out`` elements
moved, priced by the plan), and ``xa`` is copied out too, so nothing saved shares ``y``'s
storage. ``dX`` goes to autograd, which takes gradients of any strides, and to its producer's
backward (the RMSNorm kernel reads rows by their stride): it is returned as the view, and the
``r`` extra columns (``r/in`` of dX's memory) live as long as it does.

The stacked buffers ``[W; A]`` (``[out + r, in]``) and ``[W | B]`` (``[out, in + r]``) are built
each call and freed when the product returns (the caching allocator hands the same blocks back):
W is copied in from a dense base; a 4-bit base is dequantized straight into the first rows of
``[W; A]`` (it is dequantized every call anyway), and into its scratch, then copied, for
``[W | B]`` (bitsandbytes writes only a contiguous buffer). Peak memory of a stacked forward:
the buffer, ``[T, out + r]`` and ``y`` at once.
"""

from __future__ import annotations

import torch

from .lowrank_mm import lowrank_mm
from .toolkit import base_weight_shape, dense_weight

__all__ = ["columns_stack", "rows_stack", "stacked_dx", "stacked_forward"]


def rows_stack(weight: torch.Tensor, lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[W; A]``, ``[out + r, in]`` in ``dtype``: the forward's stacked weight."""
    out_features, in_features = base_weight_shape(weight)
    stack = torch.empty(out_features + lora_a.shape[0], in_features, dtype=dtype, device=lora_a.device)
    dense_weight(weight, dtype, out=stack[:out_features])
    stack[out_features:].copy_(lora_a)
    return stack


def columns_stack(weight: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[W | B]``, ``[out, in + r]`` in ``dtype``: dX's stacked weight."""
    out_features, in_features = base_weight_shape(weight)
    stack = torch.empty(out_features, in_features + lora_b.shape[1], dtype=dtype, device=lora_b.device)
    dense_weight(weight, dtype, scratch=True, out=stack[:, :in_features])
    stack[:, in_features:].copy_(lora_b)
    return stack


def stacked_forward(x2: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    bias: torch.Tensor | None, scale: float, xa_out: torch.Tensor, host_bound: bool) -> torch.Tensor:
    """``y = x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ`` for ``x2 [T, in]`` as a new contiguous ``[T, out]``, with
    ``x·Aᵀ`` from the GEMM ``x·[W; A]ᵀ``, written into ``xa_out [T, r]`` (the module doc)."""
    out_features, rank = lora_b.shape
    stack = rows_stack(weight, lora_a, x2.dtype)
    if bias is None:
        full = x2 @ stack.t()
    else:  # the bias in the GEMM's epilogue, zeros under xa
        full = torch.addmm(torch.cat([bias, bias.new_zeros(rank)]), x2, stack.t())
    del stack
    y = full[:, :out_features].clone(memory_format=torch.contiguous_format)
    xa = full[:, out_features:]
    lowrank_mm(xa, lora_b.t(), alpha=scale, out=y, accumulate=True, host_bound=host_bound)
    xa_out.copy_(xa)
    return y


def stacked_dx(dy: torch.Tensor, weight: torch.Tensor, lora_b: torch.Tensor, scale: float, dx_full: torch.Tensor,
               in_features: int, accumulate: bool, g_out: torch.Tensor) -> None:
    """``dX (+)= dY·W`` into ``dx_full[:, :in]`` and ``g_out = s·dY·B`` (``[T, r]``, fp32) from the
    GEMM ``dY·[W | B]`` into ``dx_full[:, :in + r]`` (``dx_full`` is ``[T, in + r']``, ``r' >= r``).

    ``accumulate``: dX holds an earlier sibling's sum, which the GEMM adds to (``beta = 1``); the
    columns of ``dY·B`` are zeroed first, so they receive the product alone, rounded once.
    """
    rank = lora_b.shape[1]
    stack = columns_stack(weight, lora_b, dy.dtype)
    target, thin = dx_full[:, :in_features + rank], dx_full[:, in_features:in_features + rank]
    if accumulate:
        thin.zero_()
        target.addmm_(dy, stack)
    else:
        torch.mm(dy, stack, out=target)
    del stack
    g_out.copy_(thin)
    if scale != 1.0:
        g_out.mul_(scale)
