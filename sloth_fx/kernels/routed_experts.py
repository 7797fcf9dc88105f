"""Routed experts (Mixture-of-Experts) with LoRA beside each stacked projection, as transformers'
``MixtralExperts`` computes them (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

For ``hidden [T, H]``, ``top_k_index``/``top_k_weights [T, k]``, stacked ``W1 [E, 2I, H]``
(gate_up), ``W2 [E, H, I]`` (down), LoRA ``A [E, r, in]``, ``B [E, out, r]`` and scaling ``s``::

    M_e = W_e + s·B_e·A_e                                      (per projection; no LoRA: M_e = W_e)
    out[t] = Σ_j w[t,j] · M2_e·(act(g) * u),  g | u = M1_e·hidden[t],  e = top_k_index[t,j]

Forward. The ``S = T·k`` slots are stable-sorted by expert (``perm``); ``offsets`` (int32 ``[E]``)
ends each expert's segment. With ``x_s = hidden[perm // k]`` and ``w_s`` the slot's weight:

    GU = x·W1_eᵀ + s1·U1·B1_eᵀ,  U1 = x·A1_eᵀ           [S, 2I], LoRA added in place (one rounding)
    h  = act(GU[:, :I]) * GU[:, I:]                      [S, I], one fused kernel (fp32 math)
    O  = h·W2_eᵀ + s2·U2·B2_eᵀ,  U2 = h·A2_eᵀ             [S, H]
    out[t] = Σ_j w_s·O_s over the token's k slots        one read of each slot, fp32, one rounding (slot_sum)

The base products are torch's grouped GEMM (one launch for all experts) where it takes them,
else a loop over experts (:func:`grouped_base_mm`); the LoRA products are
:mod:`~sloth_fx.kernels.grouped_lora`'s, one launch each.

Backward, for ``dF [T, H]`` gathered to slots (``dF_s = dF[t(s)]``):

    Q  = dF_s·M2_e = dF_s·W2_e + s2·V2·A2_e,  V2 = dF_s·B2_e                    [S, I]
    dw_s = Σ_i h_s,i·Q_s,i                       the router's gradient (O is not needed)
    dh = w_s·Q;  dg = dh * u * act'(g),  du = dh * act(g)      one fused kernel with dw (h recomputed)
    dX = dGU·W1_e + s1·V1·A1_e,  V1 = dGU·B1_e;   dhidden[t] = Σ over the token's slots of dX
    dA1_e = s1·V1ᵀ·x,  dB1_e = s1·dGUᵀ·U1,  dA2_e = s2·(w·V2)ᵀ·h,  dB2_e = s2·(dF_s)ᵀ·(w·U2)
    dW1_e = dGUᵀ·x,  dW2_e = (w·dF_s)ᵀ·h         only where the stacked weights train (no LoRA)

(summed over expert ``e``'s slots; ``act'`` as in :mod:`~sloth_fx.kernels.gated_mlp`).

Saved for backward: ``hidden`` (``dA1``'s kernel reads ``x``'s rows from it), ``top_k_weights``,
``perm`` (int64 ``[S]``), ``offsets``, ``GU`` ``[S, 2I]`` in hidden's dtype, ``U1`` and ``U2``
(fp32 ``[S, r]``, with LoRA), and the weights and LoRA factors themselves (parameters, no
copies). In a selectively recomputed layer (:mod:`sloth_fx.memory.saved_products`) the forward
also keeps ``perm``, ``offsets``, ``GU``, ``U1``, ``U2`` and its output, and the recompute takes
them back instead of running the products again: per token, ``k·(2I)`` values in hidden's dtype,
``H`` more, ``k`` int64 and ``4·k·(r1 + r2)`` bytes.

QLoRA: a stacked weight may be a bitsandbytes 4-bit one (nf4 or fp4, whose quant state holds the
``[E, out, in]`` shape it was quantized from: :mod:`~sloth_fx.kernels.routed_experts_args`). Then
``W_e`` above is expert ``e`` of ``dequantize_4bit(W)``, in its quant state's dtype, which must be
hidden's. The whole stack is dequantized for each product that reads it (the forward's base
product, backward's ``Q`` for ``W2`` and ``dX`` for ``W1``): a dense transient of one stack, freed
when its product returns. Backward keeps the 4-bit parameter (no copy), never its dense stack; a
4-bit stack gets no gradient (the check refuses one that requires grad).

No host synchronisation on the CUDA path with 16-bit operands, except where torch's grouped GEMM
refuses them and the per-expert loop takes over (checked with dense stacks; bitsandbytes'
dequantization of a 4-bit one is not checked for it). ``top_k_index`` must hold experts in ``[0, E)``
(values are never read on the host, so this is not checked). Weights may be any strided views
(PEFT's ``lora_B`` view, a transposed stacked weight); LoRA gradients are written in their strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sloth_fx.memory.saved_products import recall, remember

from .gated_mlp import ACTIVATIONS, _activation, gated_mlp_reference
from .grouped_lora import grouped_base_mm, grouped_lowrank_grad, grouped_lowrank_mm, grouped_weight_grad
from .launch import launch
from .routed_experts_args import ExpertProjection, check, signature
from .slot_sum import slot_sum
from .toolkit import (SUPPORTED_DTYPES, base_weight_shape, cdiv, dense_weight, is_4bit, next_power_of_2, refusal,
                      use_triton, validate)

__all__ = ["ExpertProjection", "RoutedExpertsFunction", "routed_experts", "routed_experts_reference",
           "routed_experts_supports"]

_MAX_BLOCK = 1024  # columns of the gated kernels' tiles, as gated_mlp's
_ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}


@triton.jit
def _gate_fwd_kernel(gu_ptr, h_ptr, I, stride_gu, stride_h, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """h[row, tile] = act(gu[row, tile]) * gu[row, I + tile], fp32 math, one rounding."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation(g, ACT, False)
    tl.store(h_ptr + row * stride_h + cols, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(gu_ptr, q_ptr, w_ptr, dgu_ptr, dw_ptr, h_ptr, I, stride_gu, stride_q, stride_dgu, stride_h,
                     ACT: tl.constexpr, WRITE_H: tl.constexpr, BLOCK: tl.constexpr):
    """One slot: dw = Σ h·q, dh = w·q, then d gate and d up; h as the forward rounded it."""
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, I, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(q_ptr + row * stride_q + cols, mask=mask, other=0.0).to(tl.float32)
        a, da = _activation(g, ACT, True)
        h = (a * u).to(gu_ptr.dtype.element_ty)
        if WRITE_H:
            tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        dw += h.to(tl.float32) * q
        dh = w * q
        tl.store(dgu_ptr + row * stride_dgu + cols, (dh * u * da).to(dgu_ptr.dtype.element_ty), mask=mask)
        tl.store(dgu_ptr + row * stride_dgu + I + cols, (dh * a).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + row, tl.sum(dw, 0))


def _gate_forward(gu: torch.Tensor, act: int) -> torch.Tensor:
    """``act(gate) * up`` of ``gu [S, 2I]``'s halves, ``[S, I]`` in gu's dtype."""
    s, i = gu.shape[0], gu.shape[1] // 2
    if not (use_triton(gu) and gu.dtype in SUPPORTED_DTYPES):
        wide = torch.promote_types(gu.dtype, torch.float32)
        return gated_mlp_reference(*(half.to(wide) for half in gu.chunk(2, dim=1)), _ACT_NAMES[act]).to(gu.dtype)
    h = torch.empty(s, i, device=gu.device, dtype=gu.dtype)
    if s and i:
        block = min(_MAX_BLOCK, next_power_of_2(i))
        launch(_gate_fwd_kernel, (s, cdiv(i, block)), gu, h, i, gu.stride(0), h.stride(0), ACT=act, BLOCK=block)
    return h


def _gate_backward(gu: torch.Tensor, q: torch.Tensor, w: torch.Tensor, act: int,
                   write_h: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dGU ``[S, 2I]``, the router's fp32 ``dw [S]``, ``h`` when ``write_h``) from ``gu``,
    ``Q [S, I]`` and the slots' weights ``w [S]``."""
    s, i = q.shape
    if not (use_triton(gu) and gu.dtype in SUPPORTED_DTYPES):
        wide = torch.promote_types(gu.dtype, torch.float32)
        with torch.enable_grad():
            g, u = (half.detach().to(wide).requires_grad_() for half in gu.chunk(2, dim=1))
            h = gated_mlp_reference(g, u, _ACT_NAMES[act])
            dgu = torch.cat(torch.autograd.grad(h, (g, u), q.to(wide) * w.to(wide)[:, None]), dim=1)
        h = h.detach().to(gu.dtype)
        return dgu.to(gu.dtype), (h.to(wide) * q.to(wide)).sum(1), h if write_h else None
    dgu = torch.empty_like(gu)
    dw = torch.empty(s, device=gu.device, dtype=torch.float32)
    h = torch.empty(s, i, device=gu.device, dtype=gu.dtype) if write_h else dw  # dw: an unused pointer
    if s:
        block = min(_MAX_BLOCK, next_power_of_2(max(i, 1)))
        launch(_gate_bwd_kernel, (s,), gu, q, w, dgu, dw, h, i, gu.stride(0), q.stride(0), dgu.stride(0),
               h.stride(0), ACT=act, WRITE_H=write_h, BLOCK=block)
    return dgu, dw, h if write_h else None


def _lora_forward(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float,
                  offsets: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``y += s·(x·A_eᵀ)·B_eᵀ`` in place; returns ``U = x·A_eᵀ`` (fp32), None without LoRA."""
    if a is None:
        return None
    u = grouped_lowrank_mm(x, a, offsets)
    grouped_lowrank_mm(u, b, offsets, y, alpha=scaling, accumulate=True)
    return u


class RoutedExpertsFunction(torch.autograd.Function):
    """The routed experts with LoRA (module doc): a hand-derived backward; gradients for
    ``hidden``, ``top_k_weights``, the LoRA factors and the stacked weights where they train."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                w1: torch.Tensor, a1: torch.Tensor | None, b1: torch.Tensor | None,
                w2: torch.Tensor, a2: torch.Tensor | None, b2: torch.Tensor | None,
                s1: float, s2: float, act: int) -> torch.Tensor:
        recalled = recall(w1, hidden)  # a selective recompute takes the forward's results back
        if recalled is None:
            perm, offsets, gu, u1, u2, out = _forward(hidden, top_k_index, top_k_weights, w1, a1, b1, w2, a2, b2,
                                                      s1, s2, act)
            remember(w1, hidden, (perm, offsets, gu, out, *(u for u in (u1, u2) if u is not None)))
        else:
            perm, offsets, gu, out, *lora_u = recalled
            u1 = lora_u.pop(0) if a1 is not None else None
            u2 = lora_u.pop(0) if a2 is not None else None
        # 4-bit stacks are kept on ctx, not saved: saved-tensor hooks (checkpoint, offload) would hand
        # back a detached plain tensor without its quant state; frozen leaves make no reference cycle
        ctx.packed = tuple(w if is_4bit(w) else None for w in (w1, w2))
        w1, w2 = (None if is_4bit(w) else w for w in (w1, w2))
        ctx.save_for_backward(hidden, top_k_weights, perm, offsets, gu, u1, u2, w1, a1, b1, w2, a2, b2)
        ctx.scalings, ctx.act = (s1, s2), act
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, top_k_weights, perm, offsets, gu, u1, u2, w1, a1, b1, w2, a2, b2 = ctx.saved_tensors
        w1, w2 = (w if packed is None else packed for w, packed in zip((w1, w2), ctx.packed))
        (s1, s2), needs = ctx.scalings, ctx.needs_input_grad
        k = top_k_weights.shape[1]
        token, inverse = perm // k, _inverse(perm)
        w = top_k_weights.reshape(-1).index_select(0, perm).to(torch.promote_types(top_k_weights.dtype, torch.float32))
        df = d_out.to(hidden.dtype).index_select(0, token)
        q = grouped_base_mm(df, dense_weight(w2, hidden.dtype), offsets)
        da2 = db2 = da1 = db1 = None
        if a2 is not None:
            v2 = grouped_lowrank_mm(df, b2.transpose(-2, -1), offsets)
            grouped_lowrank_mm(v2, a2.transpose(-2, -1), offsets, q, alpha=s2, accumulate=True)
            if needs[8]:
                db2 = grouped_lowrank_grad(df, u2 * w[:, None], offsets, torch.empty_like(b2), alpha=s2)
        dgu, dw, h = _gate_backward(gu, q, w, ctx.act, (a2 is not None and needs[7]) or needs[6])
        if a2 is not None and needs[7]:
            da2 = grouped_lowrank_grad(v2 * w[:, None], h, offsets, torch.empty_like(a2), alpha=s2)
        dw2 = grouped_weight_grad(df * w[:, None].to(df.dtype), h, offsets, w2.dtype) if needs[6] else None
        dw1 = grouped_weight_grad(dgu, hidden.index_select(0, token), offsets, w1.dtype) if needs[3] else None
        d_top_k_weights = dw.index_select(0, inverse).view_as(top_k_weights).to(top_k_weights.dtype)
        dx = grouped_base_mm(dgu, dense_weight(w1, hidden.dtype), offsets) if needs[0] else None
        if a1 is not None and (needs[0] or needs[4] or needs[5]):
            v1 = grouped_lowrank_mm(dgu, b1.transpose(-2, -1), offsets)
            if dx is not None:
                grouped_lowrank_mm(v1, a1.transpose(-2, -1), offsets, dx, alpha=s1, accumulate=True)
            if needs[4]:
                da1 = grouped_lowrank_grad(v1, hidden, offsets, torch.empty_like(a1), alpha=s1, q_rows=token)
            if needs[5]:
                db1 = grouped_lowrank_grad(dgu, u1, offsets, torch.empty_like(b1), alpha=s1)
        d_hidden = None if dx is None else slot_sum(dx, inverse, k, None, hidden.dtype)
        return (d_hidden, None, d_top_k_weights if needs[2] else None, dw1, da1, db1, dw2, da2, db2,
                None, None, None)


def _forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             w1: torch.Tensor, a1: torch.Tensor | None, b1: torch.Tensor | None,
             w2: torch.Tensor, a2: torch.Tensor | None, b2: torch.Tensor | None,
             s1: float, s2: float, act: int) -> tuple[torch.Tensor, ...]:
    """The module doc's forward: ``(perm, offsets, GU, U1, U2, out)``, U None without LoRA."""
    k = top_k_index.shape[1]
    experts, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    # E from the quantized shape: a 4-bit stack's own shape[0] is its packed storage's
    bounds = torch.arange(base_weight_shape(w1)[0], device=experts.device, dtype=experts.dtype)
    offsets = torch.searchsorted(experts, bounds, right=True, out_int32=True)
    x = hidden.index_select(0, perm // k)
    # a 4-bit stack's dense transient lives for its product only
    gu = grouped_base_mm(x, dense_weight(w1, hidden.dtype).transpose(-2, -1), offsets)
    u1 = _lora_forward(x, a1, b1, s1, offsets, gu)
    h = _gate_forward(gu, act)
    o = grouped_base_mm(h, dense_weight(w2, hidden.dtype).transpose(-2, -1), offsets)
    u2 = _lora_forward(h, a2, b2, s2, offsets, o)
    return perm, offsets, gu, u1, u2, slot_sum(o, _inverse(perm), k, top_k_weights, hidden.dtype)


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation (a scatter: no sort, no host sync)."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _project(x: torch.Tensor, proj: ExpertProjection, e: int) -> torch.Tensor:
    y = x @ proj.weight[e].double().T
    if proj.lora_a is None:
        return y
    return y + proj.scaling * (x @ proj.lora_a[e].double().T) @ proj.lora_b[e].double().T


def routed_experts_reference(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                             gate_up: ExpertProjection, down: ExpertProjection, activation: str) -> torch.Tensor:
    """transformers' ``MixtralExperts.forward`` loop with LoRA beside each projection, in float64
    throughout (differentiable: the tests' reference), returned in hidden's dtype."""
    final = torch.zeros_like(hidden, dtype=torch.float64)
    x64, w64 = hidden.double(), top_k_weights.double()
    for e in range(gate_up.weight.shape[0]):
        top_k_pos, token_idx = torch.where(top_k_index.T == e)
        if token_idx.numel() == 0:
            continue
        gate, up = _project(x64[token_idx], gate_up, e).chunk(2, dim=-1)
        o = _project(gated_mlp_reference(gate, up, activation), down, e) * w64[token_idx, top_k_pos, None]
        final = final.index_add(0, token_idx, o)
    return final.to(hidden.dtype)


_VALID: set[tuple] = set()


def routed_experts_supports(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                            gate_up: ExpertProjection, down: ExpertProjection, activation: str) -> str | None:
    """None when :func:`routed_experts` takes these arguments, else the reason (types, shapes,
    dtypes, devices and ``requires_grad`` only: fake tensors do)."""
    return refusal(check, hidden, top_k_index, top_k_weights, gate_up, down, activation)


def routed_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                   gate_up: ExpertProjection, down: ExpertProjection, activation: str) -> torch.Tensor:
    """``[T, H]`` in hidden's dtype: the routed experts of the module doc, differentiable in
    ``hidden``, ``top_k_weights`` and the LoRA factors. Raises :class:`UnsupportedType` /
    :class:`UnsupportedValue` for what :func:`routed_experts_supports` refuses."""
    validate(_VALID, signature, check, hidden, top_k_index, top_k_weights, gate_up, down, activation)
    return RoutedExpertsFunction.apply(hidden, top_k_index, top_k_weights, gate_up.weight, gate_up.lora_a,
                                       gate_up.lora_b, down.weight, down.lora_a, down.lora_b, float(gate_up.scaling),
                                       float(down.scaling), ACTIVATIONS[activation])
