"""The autograd Function of the LoRA linears: their forward and backward written out as products.

For the linears ``y_i = x·W_iᵀ (+ b_i) + s_i · (x·A_iᵀ)·B_iᵀ`` of :mod:`~sloth_fx.kernels.lora` (the
op: what PEFT computes, the inputs it takes, the plan of each linear). Every product with the rank
as a dimension goes through :func:`~sloth_fx.kernels.lowrank_mm.lowrank_mm`.

Forward (``xa = x·[A_1; A_2; …]ᵀ`` in one product, fp32, ``x`` read once for every adapter not
stacked)::

    factored   y_i = x·W_iᵀ (+ b_i);   y_i += s_i · xa_i·B_iᵀ      (in place, one rounding for the sum)
    merged     W'_i = W_i + s_i·B_i·A_i (fp32 sum, rounded once, a temporary);   y_i = x·W'_iᵀ (+ b_i)
    stacked    [x·W_iᵀ + b_i | xa_i] = x·[W_i; A_i]ᵀ;   y_i = copy;   y_i += s_i · xa_i·Bᵀ   (lora_stack)

Saved for backward: ``x`` (for dA, and dW if the base trains) and ``xa`` (fp32 ``[T, sum r_i]``,
for dB; a stacked sibling's columns hold its GEMM's rounded ``xa_i``); the parameters are saved
too and cost no memory. Backward, with ``g_i = s_i · dY_i·B_i`` (fp32 ``[T, r_i]``, computed once,
used by dX and dA)::

    dX   = Σ_i dY_i·W_i  +  [g_1 … g_n]·[A_1; …; A_n]        one buffer: the first product writes it,
                                                             the others accumulate in place
           (a merged sibling contributes dY_i·W'_i instead of both of its terms; a stacked one
           [dY_i·W_i | dY_i·B_i] from dY_i·[W_i | B_i], its g_i from the second part: lora_stack)
    dA_i = g_iᵀ·x            (all siblings in one product: [g_1 … g_n]ᵀ·x)
    dB_i = s_i · dY_iᵀ·xa_i   db_i = Σ_rows dY_i            dW_i = dY_iᵀ·x (only if W_i trains)

dA and dB are accumulated in fp32 and rounded once to the adapters' dtype.

With ``xd`` (one linear, both forms factored: ``x`` and ``xd`` differ, so ``W + s·B·A`` does not
apply) the two inputs split the gradient, and autograd carries ``d(xd)`` into dropout's backward::

    xa = xd·Aᵀ      dX = dY·W      d(xd) = g·A  (rounded once to xd's dtype)      dA = gᵀ·xd

``xd`` is saved instead of ``x`` for dA (``x`` only if ``W`` trains); dB is unchanged.

In the recompute of a selectively checkpointed layer (:mod:`sloth_fx.memory.saved_products`), the
forward's ``y_i`` and ``xa`` are taken back instead of computed again: the recompute saves the same
tensors for backward and runs none of the group's products.

Steps of fewer than ``HOST_BOUND_TOKENS`` tokens are host-bound: the host spends longer queueing
a step's many small ops than the GPU spends running them, so every rank-r product of such a call
runs as plain PyTorch (``lowrank_mm``'s ``host_bound``: fp32 copies and cuBLAS, fewer host cycles
than a Triton launch, more GPU time), and longer steps, which keep the GPU busy, run the Triton
kernel (no copies). One decision per call, so the siblings of a group never mix the two. On an
H200 (2026-11-30, Llama-2-7B, fp32 adapters, kernels launched through
:mod:`~sloth_fx.kernels.launch`, one process alternating the two paths on the same batches; median
tokens/s): 512-token steps 2555 (PyTorch) against 2329 (Triton), 1024-token steps 5717 against
5333, ~2200-token packed steps (R1p) 11708 against 12743, 4096-token steps (E2) faster on Triton.
The constant is not the steady-state crossover (between 1024 and ~2200 tokens) because the
kernel specialises its M and K on their divisibility by 16: on ragged steps the first token count
of a new class compiles every product again, and with the constant at 2048 the last step of an
8-step R1p run took 4.6 s against about 0.3 s for the others (2038 tokens/s). Below 4096 tokens that
stall is not worth the gain: with the token count left unspecialised and the constant at 2048,
R1p ran at 9724 tokens/s against 9762 at 4096 (same H200, same day). The crossover depends on the
model's width, the GPU and the host.

A bitsandbytes 4-bit base weight is dequantized for the product that needs it — once in forward,
once again in backward — and never kept alive from one to the other: on CUDA into a scratch
buffer that the next 4-bit product of that shape overwrites, which is safe because the products
run in stream order (do not run these ops concurrently from several streams or threads; see
:func:`~sloth_fx.kernels.toolkit.dense_weight`). A stacked forward dequantizes into its own
``[W; A]`` buffer instead, freed when the product returns (:mod:`~sloth_fx.kernels.lora_stack`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sloth_fx.memory.saved_products import recall, remember

from .lora_plan import LoRAPlan
from .lora_stack import stacked_dx, stacked_forward
from .lora_thin import thin_grads_wide, thin_products
from .lowrank_mm import lowrank_mm, runs_wide, wide_dtype
from .toolkit import dense_weight, is_4bit

__all__ = ["HOST_BOUND_TOKENS", "LoRAGroupFunction"]

HOST_BOUND_TOKENS = 4096  # a call over fewer tokens runs its rank-r products as PyTorch (module doc)


def _merged_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype,
                   host_bound: bool) -> torch.Tensor:
    """``W + s·B·A`` summed in fp32 and rounded once to ``dtype``: a temporary, never kept."""
    merged = w.clone() if w.dtype == dtype else w.to(dtype)
    return lowrank_mm(b, a, alpha=s, out=merged, accumulate=True, host_bound=host_bound)


def _products(x: torch.Tensor, x2: torch.Tensor, src: torch.Tensor, weights: Sequence[torch.Tensor],
              lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor],
              biases: Sequence[torch.Tensor | None], scales: Sequence[float], plans: Sequence[LoRAPlan],
              host_bound: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The group's outputs ``y_i`` (shaped as ``x``) and ``xa`` (fp32), each linear in its plan's form."""
    ranks = [a.shape[0] for a in lora_as]
    src2 = src.reshape(-1, src.shape[-1])
    stacked = [p.forward == "stacked" for p in plans]
    if not any(stacked):
        # One product for every adapter; the concatenation copies sum(r_i)·in parameter elements.
        xa = lowrank_mm(src2, _cat(lora_as).t(), host_bound=host_bound)
    else:
        xa = torch.empty(src2.shape[0], sum(ranks), device=src2.device, dtype=wide_dtype(src2, *lora_as))
        for lo, hi in _runs([not s for s in stacked]):
            lowrank_mm(src2, _cat(lora_as[lo:hi]).t(), out=_columns(xa, ranks, lo, hi), host_bound=host_bound)
    outs = []
    for i, (w, a, b, bias, s, xa_i, plan) in enumerate(zip(weights, lora_as, lora_bs, biases, scales,
                                                          xa.split(ranks, dim=1), plans)):
        if stacked[i]:
            y = stacked_forward(x2, w, a, b, bias, s, xa_i, host_bound)
        else:
            dense = dense_weight(w, x.dtype, scratch=True)
            if plan.forward == "merged":
                dense = _merged_weight(dense, a, b, s, x.dtype, host_bound)
            y = torch.addmm(bias, x2, dense.t()) if bias is not None else x2 @ dense.t()
            del dense
            if plan.forward == "factored":
                lowrank_mm(xa_i, b.t(), alpha=s, out=y, accumulate=True, host_bound=host_bound)
        outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
    return outs, xa


class LoRAGroupFunction(torch.autograd.Function):
    """``apply(x, xd, scales, plans, n, *weights, *lora_as, *lora_bs, *biases)`` -> n outputs.

    Forward and backward formulas, and what is saved, in the module doc. ``xd`` is None (the
    adapters read ``x``) or, for one linear (``n == 1``) with factored plans, the adapters' own
    input (PEFT's ``dropout(x)``). ``plans`` holds one :class:`~sloth_fx.kernels.lora_plan.LoRAPlan`
    per linear. Inputs are validated by :func:`~sloth_fx.kernels.lora.lora_linear_group`; call that,
    not this.
    """

    @staticmethod
    def forward(ctx, x, xd, scales, plans, n, *params):
        weights, lora_as, lora_bs, biases = (params[i * n:(i + 1) * n] for i in range(4))
        x2 = x.reshape(-1, x.shape[-1])  # a view when x's last dims are contiguous, else a copy
        host_bound = x2.shape[0] < HOST_BOUND_TOKENS
        src = x if xd is None else xd  # what the adapters read
        ranks = [a.shape[0] for a in lora_as]
        recalled = recall(weights[0], x)  # a selective recompute takes the forward's outputs back
        if recalled is None:
            outs, xa = _products(x, x2, src, weights, lora_as, lora_bs, biases, scales, plans, host_bound)
            remember(weights[0], x, (*outs, xa))
        else:
            *outs, xa = recalled
        need = ctx.needs_input_grad
        need_w = any(need[5 + i] for i in range(n))
        need_a = any(need[5 + n + i] for i in range(n))
        need_xa = any(need[5 + 2 * n + i] for i in range(n))  # dB
        # x for dW, and for dA when the adapters read it; xd for dA when they read xd
        keep_x = need_w or (need_a and xd is None)
        keep_xd = need_a and xd is not None
        dense_params = [None if is_4bit(p) else p for p in params]
        ctx.save_for_backward(x if keep_x else None, xd if keep_xd else None, xa if need_xa else None, *dense_params)
        ctx.quantized = {i: w for i, w in enumerate(weights) if is_4bit(w)}  # frozen leaves: no cycle
        ctx.x_shape, ctx.scales, ctx.plans, ctx.n, ctx.ranks = x.shape, scales, plans, n, ranks
        ctx.adapters_read_x, ctx.host_bound = xd is None, host_bound
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, xd, xa, *params = ctx.saved_tensors
        n, scales, ranks, plans, host_bound = ctx.n, ctx.scales, ctx.ranks, ctx.plans, ctx.host_bound
        for i, w in ctx.quantized.items():
            params[i] = w
        weights, lora_as, lora_bs, biases = (params[i * n:(i + 1) * n] for i in range(4))
        need = ctx.needs_input_grad
        need_dx, need_dxd = need[0], need[1]
        need_w = [need[5 + i] for i in range(n)]
        need_a = [need[5 + n + i] for i in range(n)]
        need_b = [need[5 + 2 * n + i] for i in range(n)]
        need_bias = [biases[i] is not None and need[5 + 3 * n + i] for i in range(n)]
        cd = grads[0].dtype
        x2 = x.reshape(-1, x.shape[-1]) if x is not None else None
        src = x2 if ctx.adapters_read_x else (xd.reshape(-1, xd.shape[-1]) if xd is not None else None)
        xa_split = xa.split(ranks, dim=1) if xa is not None else [None] * n
        dys = [g.reshape(-1, g.shape[-1]) for g in grads]
        # g = [s_1·dY_1·B_1, …, s_n·dY_n·B_n], fp32 [T, sum r_i]: used by dX (or d(xd)) and dA; a
        # sibling whose dX is stacked gets its columns from its dX product instead of its own
        adapter_dx = need_dx and ctx.adapters_read_x
        dx_stacked = [need_dx and plans[i].backward_dx == "stacked" for i in range(n)]
        need_g = [not dx_stacked[i] and (need_a[i] or need_dxd or (adapter_dx and plans[i].backward_dx == "factored"))
                  for i in range(n)]
        d_w, d_a, d_bias = [None] * n, [None] * n, [None] * n
        if all(runs_wide(dy, b, host_bound=host_bound) for dy, b in zip(dys, lora_bs)):
            # one product for every sibling's g: a stacked sibling's columns are overwritten below
            g, d_b = thin_grads_wide(dys, lora_bs, xa, scales, ranks, any(need_g), need_b)
        else:
            g = torch.empty(dys[0].shape[0], sum(ranks), device=dys[0].device, dtype=torch.float32) if any(need_g) else None
            for lo, hi in _runs(need_g):
                thin_products([(dys[i], lora_bs[i], scales[i]) for i in range(lo, hi)], 1, host_bound,
                              _columns(g, ranks, lo, hi))
            d_b = [None] * n
            for lo, hi in _runs(need_b):
                parts = thin_products([(dys[i].t(), xa_split[i], scales[i]) for i in range(lo, hi)], 0, host_bound)
                for i, part in zip(range(lo, hi), parts):
                    d_b[i] = part.to(lora_bs[i].dtype)
        if g is None and any(dx_stacked):
            g = torch.empty(dys[0].shape[0], sum(ranks), device=dys[0].device, dtype=wide_dtype(dys[0], lora_bs[0]))
        for i in range(n):
            if need_w[i]:
                d_w[i] = dys[i].t() @ x2
            if need_bias[i]:
                d_bias[i] = dys[i].sum(0, dtype=torch.float32).to(biases[i].dtype)

        dx = None
        if need_dx:
            in_features = ctx.x_shape[-1]
            # one buffer for dX and, to its right, the widest stacked sibling's dY·B (lora_stack's doc)
            extra = max((r for r, stacked in zip(ranks, dx_stacked) if stacked), default=0)
            dx_full = torch.empty(dys[0].shape[0], in_features + extra, device=dys[0].device, dtype=cd)
            dx = dx_full[:, :in_features]
            for i in range(n):
                if dx_stacked[i]:
                    stacked_dx(dys[i], weights[i], lora_bs[i], scales[i], dx_full, in_features, i > 0,
                               _columns(g, ranks, i, i + 1))
                    continue
                weight = dense_weight(weights[i], cd, scratch=True)
                if plans[i].backward_dx == "merged":
                    weight = _merged_weight(weight, lora_as[i], lora_bs[i], scales[i], cd, host_bound)
                if i == 0:
                    torch.mm(dys[i], weight, out=dx)
                else:
                    dx.addmm_(dys[i], weight)
                del weight
            if adapter_dx:
                for lo, hi in _runs([plans[i].backward_dx != "merged" for i in range(n)]):
                    lowrank_mm(_columns(g, ranks, lo, hi), _cat(lora_as[lo:hi]), out=dx, accumulate=True,
                               host_bound=host_bound)
        dxd = None
        if need_dxd:  # one linear (n == 1): d(xd) = g·A, rounded once to the adapters' dtype (xd's)
            dxd = torch.empty(g.shape[0], lora_as[0].shape[1], device=g.device, dtype=lora_as[0].dtype)
            dxd = lowrank_mm(g, lora_as[0], out=dxd, host_bound=host_bound).reshape(ctx.x_shape)
        for lo, hi in _runs(need_a):
            # every dA in one product
            rows = lowrank_mm(_columns(g, ranks, lo, hi).t(), src, host_bound=host_bound)
            for i, part in zip(range(lo, hi), rows.split(ranks[lo:hi], dim=0)):
                d_a[i] = part.to(lora_as[i].dtype)
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return (dx, dxd, None, None, None, *d_w, *d_a, *d_b, *d_bias)


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The siblings' A (or B) rows in one tensor: the first itself when alone, else a copy."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _columns(t: torch.Tensor, ranks: Sequence[int], lo: int, hi: int) -> torch.Tensor:
    """Siblings ``lo..hi-1``'s columns of ``t`` (``xa`` or ``g``, ``[T, sum r_i]``)."""
    return t[:, sum(ranks[:lo]):sum(ranks[:hi])]


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """The maximal runs ``[lo, hi)`` of consecutive true flags: the siblings whose slices of
    ``g`` are adjacent columns and so go into one product."""
    runs, lo = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and lo is None:
            lo = i
        elif not flag and lo is not None:
            runs.append((lo, i))
            lo = None
    return runs
