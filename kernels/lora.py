"""LoRA linears sharing one input, with the backward written out.

PEFT computes, for each linear ``i`` reading the same ``x`` (q, k, v; or gate, up)::

    y_i = x·W_iᵀ (+ b_i) + s_i · (x·A_iᵀ)·B_iᵀ          W_i [out_i, in] frozen, A_i [r_i, in], B_i [out_i, r_i]

The adapters may be in another dtype than the base (PEFT keeps fp32 adapters on a bf16 model):
then ``x`` is cast to the adapters' dtype for their products and ``y_i`` comes out in the promoted
dtype, as PEFT's sum does (the graph casts it back after). Forward: ``xa = x·[A_1; A_2; ...]ᵀ``
in one product (``x`` read once for every adapter), then ``y_i = addmm(x·W_iᵀ, xa_i, B_iᵀ, alpha=s_i)``
(one rounding for the sum). Saved for backward: ``x`` and ``xa`` (plus the parameters, which cost
nothing). Backward, with ``g_i = dY_i·B_i``::

    dX  = Σ_i dY_i·W_i + Σ_i s_i · g_i·A_i       accumulated in place into one buffer
    dA_i = s_i · g_iᵀ·x          dB_i = s_i · dY_iᵀ·xa_i          db_i = Σ_rows dY_i

Each product is bracketed the cheaper way for the actual shapes by ``sloth_fx.cost_model``:
``dY·(W + s·B·A)`` (the adapter folded into the base weight) against ``dY·W + s·(dY·B)·A``, and
likewise forward. A bitsandbytes 4-bit base weight is dequantized for the product that needs it
and dropped right after, never kept until backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sloth_fx.cost_model import lora_plan

__all__ = ["lora_linear_reference", "lora_linear", "lora_linear_group", "LoRAGroupFunction"]


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's LoRA linear, op for op (without the final cast back to the base dtype)."""
    result = F.linear(x, dense_weight(weight, x.dtype), bias)
    return result + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scale


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense matrix: a bitsandbytes 4-bit weight is dequantized (a temporary)."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).to(dtype)


class LoRAGroupFunction(torch.autograd.Function):
    """``apply(x, scales, n, *weights, *lora_as, *lora_bs, *biases)`` -> n outputs (see module doc)."""

    @staticmethod
    def forward(ctx, x, scales, n, *params):
        weights, lora_as, lora_bs, biases = (params[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        adapter_dtype = lora_as[0].dtype
        xa = x2.to(adapter_dtype) @ torch.cat(lora_as).t()
        ranks = [a.shape[0] for a in lora_as]
        outs, plans = [], []
        for w, b, lb, bias, s, xa_i in zip(weights, lora_as, lora_bs, biases, scales, xa.split(ranks, dim=1)):
            plan = lora_plan(x2.shape[0], x2.shape[1], lb.shape[0], b.shape[0], x.element_size())
            dense = dense_weight(w, x.dtype)
            if plan.forward == "merged":
                merged = dense.to(adapter_dtype) + s * (lb @ b)
                y = F.linear(x2.to(adapter_dtype), merged, bias)
            else:
                y = F.linear(x2, dense, bias)
                out_dtype = torch.promote_types(y.dtype, adapter_dtype)
                y = torch.addmm(y.to(out_dtype), xa_i, lb.t(), alpha=s)
            outs.append(y.reshape(*x.shape[:-1], -1))
            plans.append(plan)
        ctx.save_for_backward(x, xa, *params)
        ctx.scales, ctx.n, ctx.ranks, ctx.plans = scales, n, ranks, plans
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, xa, *params = ctx.saved_tensors
        n, scales = ctx.n, ctx.scales
        weights, lora_as, lora_bs, biases = (params[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])
        need = ctx.needs_input_grad
        dx = None
        d_w, d_a, d_b, d_bias = [None] * n, [None] * n, [None] * n, [None] * n
        for i, (dy, w, a, b, bias, s, xa_i) in enumerate(
            zip(grads, weights, lora_as, lora_bs, biases, scales, xa.split(ctx.ranks, dim=1))
        ):
            if dy is None:
                continue
            dy2 = dy.reshape(-1, dy.shape[-1])
            dy_a = dy2.to(a.dtype)
            g = dy_a @ b                                            # dY·B, reused by dX and dA
            if need[0]:
                dx = _accumulate_dx(dx, dy2, g, w, a, b, s, x2.dtype, ctx.plans[i])
            if need[3 + n + i]:
                d_a[i] = s * (g.t() @ x2.to(a.dtype))
            if need[3 + 2 * n + i]:
                d_b[i] = s * (dy_a.t() @ xa_i)
            if need[3 + i]:
                d_w[i] = (dy2.t() @ x2.to(dy2.dtype)).to(w.dtype)
            if bias is not None and need[3 + 3 * n + i]:
                d_bias[i] = dy2.sum(0).to(bias.dtype)
        dx = dx.reshape(x.shape) if dx is not None else None
        return (dx, None, None, *d_w, *d_a, *d_b, *d_bias)


def _accumulate_dx(dx, dy2, g, w, a, b, s, x_dtype, plan):
    """dX += dY·W + s·(dY·B)·A, in place into one buffer (the plan may fold the adapter into W)."""
    dense = dense_weight(w, x_dtype)
    if plan.backward_dx == "merged":
        term = dy2.to(a.dtype) @ (dense.to(a.dtype) + s * (b @ a))
        return term.to(x_dtype) if dx is None else dx.add_(term.to(x_dtype))
    base = dy2.to(x_dtype)
    if dx is None:
        dx = base @ dense
    else:
        dx.addmm_(base, dense)
    if a.dtype == x_dtype:
        return dx.addmm_(g, a, alpha=s)
    return dx.add_((s * (g @ a)).to(x_dtype))


def lora_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                      lora_bs: Sequence[torch.Tensor], scales: Sequence[float],
                      biases: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, ...]:
    """The outputs of several LoRA linears that read the same ``x`` (x is read once)."""
    n = len(weights)
    biases = list(biases) if biases is not None else [None] * n
    if not (len(lora_as) == len(lora_bs) == len(scales) == len(biases) == n) or n == 0:
        raise ValueError("lora_linear_group needs one A, B, scale and bias (or None) per weight")
    if len({a.dtype for a in lora_as} | {b.dtype for b in lora_bs}) != 1:
        raise TypeError("all adapters of a group must share one dtype")
    for w, a, b in zip(weights, lora_as, lora_bs):
        in_features = a.shape[1]
        if x.shape[-1] != in_features or b.shape[1] != a.shape[0]:
            raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)}")
    return LoRAGroupFunction.apply(x, tuple(float(s) for s in scales), n, *weights, *lora_as, *lora_bs, *biases)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """One LoRA linear: ``x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ`` with the backward above."""
    return lora_linear_group(x, [weight], [lora_a], [lora_b], [scale], [bias])[0]
