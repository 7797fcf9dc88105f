"""Rotary position embedding (RoPE) on q and k together, HF's ``apply_rotary_pos_emb``.

Maths (half-split layout, as HF's ``rotate_half``). For one head vector ``x`` of length ``D`` and
the per-token tables ``c = cos[b, s]``, ``s = sin[b, s]`` of length ``R`` (``R = rotary_dim``,
even, ``R <= D``; only the first ``R`` features rotate, the rest pass through unchanged), split
the rotated part into halves ``x = (x1, x2)``, ``c = (c1, c2)``, ``s = (s1, s2)`` of ``R/2``
features each. ``rotate_half(x) = (-x2, x1)``, so ``y = x*c + rotate_half(x)*s`` is::

    y1 = x1*c1 - x2*s1
    y2 = x2*c2 + x1*s2
    y[R:] = x[R:]

This is linear in ``x`` with a Jacobian that is the identity on the pass-through features, so the
gradient with respect to ``x`` is the transpose applied to ``dy``, written out for general
``c``/``s`` (the two halves of ``cos``/``sin`` are *not* assumed equal)::

    dx1 = dy1*c1 + dy2*s2
    dx2 = dy2*c2 - dy1*s1
    dx[R:] = dy[R:]

When the halves are equal (``c1 == c2``, ``s1 == s2``, every real rotary table) this is the
rotation by ``-theta``. The Triton kernel that computes both directions, and how it walks the
heads, is in :mod:`~sloth_fx.kernels.rope_kernel`.

Gradients with respect to ``cos``/``sin`` are not computed by the kernel; when either requires
grad, :func:`rope` uses :func:`rope_reference` (plain autograd), which is exact.
"""

from __future__ import annotations

import torch

from .rope_kernel import empty_bhsd, rotate_into
from .toolkit import SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, dtype_names, refusal, use_triton, validate

__all__ = ["rope_reference", "rope", "rope_supports", "RoPEFunction"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's ``rotate_half``: ``cat(-x[..., D/2:], x[..., :D/2])``."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` (``unsqueeze_dim=1``), op for op.

    ``q``: [B, Hq, S, D], ``k``: [B, Hk, S, D], ``cos``/``sin``: [B, S, R] (or broadcastable to
    it, e.g. [1, S, R]). With ``R == D`` this is Llama's function exactly (same ops in the same
    dtype, so the same roundings: ``q*cos`` and ``rotate_half(q)*sin`` are each rounded to the
    result dtype and then added). With ``R < D`` it is the partial-rotary form of GPT-NeoX / Phi /
    Bamba: the first ``R`` features are rotated as above and ``q[..., R:]`` is concatenated back.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[-1]:
        q_embed = (q * cos) + (_rotate_half(q) * sin)
        k_embed = (k * cos) + (_rotate_half(k) * sin)
        return q_embed, k_embed
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = (q_rot * cos) + (_rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (_rotate_half(k_rot) * sin)
    return torch.cat([q_embed, q_pass], dim=-1), torch.cat([k_embed, k_pass], dim=-1)


class RoPEFunction(torch.autograd.Function):
    """Fused rotary embedding of q and k: one kernel launch forward, one backward.

    Forward (per token, per head, halves of the first R = cos.shape[-1] features)::

        y1 = x1*c1 - x2*s1,   y2 = x2*c2 + x1*s2,   y[R:] = x[R:]

    Backward (the transpose, valid for any cos/sin, not only rotary tables)::

        dx1 = dy1*c1 + dy2*s2,   dx2 = dy2*c2 - dy1*s1,   dx[R:] = dy[R:]

    Arithmetic is fp32; each output is rounded once to its dtype (q_embed/k_embed: the promoted
    dtype of q and cos, as HF's ``q * cos`` gives; dq/dk: q's dtype). No gradient flows to
    cos/sin (``None``): :func:`rope` only takes this path when they do not require grad.

    Saved for backward: ``cos`` and ``sin`` only (the backward is linear in ``dy`` and does not
    need q or k). They are the per-forward tables HF computes once and shares across all layers,
    so saving them costs no extra memory. The launch (one program per token, every head of q and
    k) is :func:`~sloth_fx.kernels.rope_kernel.rotate_into`'s.

    Outputs are new allocations laid out [B, S, H, D] and returned as the [B, H, S, D] transposed
    view, the same strides HF's elementwise formula yields. Why not in place: q/k are views of
    the projection outputs. A plain ``nn.Linear``'s backward saves its input and weight, not its
    output, and the ``view``/``transpose`` save nothing, so in the stock graph nothing autograd
    keeps would be clobbered -- but that is a property of whatever produced q/k, which this op
    cannot see: a fused LoRA op, a dtype cast node, a hook, or another user of the projection
    output in the captured graph may hold it, and a raw Triton write bypasses autograd's
    version counter, so corruption would be silent. The out-of-place version costs one transient
    q+k-sized buffer: q/k themselves become garbage as soon as this op returns because the
    backward does not save them, so peak memory is essentially unchanged.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_dtype = torch.promote_types(q.dtype, cos.dtype)
        q_out = empty_bhsd(q.shape, out_dtype, q.device)
        k_out = empty_bhsd(k.shape, out_dtype, k.device)
        rotate_into(q, k, cos, sin, q_out, k_out, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.q_dtype = q.dtype
        return q_out, k_out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dq_out: torch.Tensor, dk_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        cos, sin = ctx.saved_tensors
        # Gradients get the same [B, S, H, D] memory layout, so that the backward of the
        # projection's view/transpose is a free reshape.
        dq = empty_bhsd(dq_out.shape, ctx.q_dtype, dq_out.device)
        dk = empty_bhsd(dk_out.shape, ctx.q_dtype, dk_out.device)
        rotate_into(dq_out, dk_out, cos, sin, dq, dk, backward=True)
        return (
            dq if ctx.needs_input_grad[0] else None,
            dk if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise :class:`UnsupportedValue`/:class:`UnsupportedType` for inputs no path of :func:`rope` takes."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise UnsupportedType("rope", f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4:
        raise UnsupportedValue(
            "rope", f"q and k must be 4-d [B, H, S, D], got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if cos.dim() != 3 or sin.shape != cos.shape:
        raise UnsupportedValue(
            "rope", "cos and sin must both be 3-d [B, S, rotary_dim] of equal shape, got "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    bsz, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (bsz, seq, head_dim):
        raise UnsupportedValue(
            "rope", f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch, sequence and head_dim"
        )
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 != 0 or rotary_dim <= 0 or rotary_dim > head_dim:
        raise UnsupportedValue(
            "rope", f"rotary_dim = cos.shape[-1] = {rotary_dim} must be even and in (0, head_dim = {head_dim}]"
        )
    if cos.shape[0] not in (1, bsz) or cos.shape[1] not in (1, seq):
        raise UnsupportedValue(
            "rope", f"cos/sin {tuple(cos.shape)} do not broadcast to [B={bsz}, S={seq}, {rotary_dim}]"
        )
    devices = {t.device for t in (q, k, cos, sin)}
    if len(devices) != 1:
        raise UnsupportedValue("rope", f"q, k, cos, sin must be on one device, got {sorted(map(str, devices))}")


def _check_dtypes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Raise :class:`UnsupportedType` for dtypes the fused kernel does not take."""
    if q.dtype != k.dtype:
        raise UnsupportedType("rope", f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if cos.dtype != sin.dtype:
        raise UnsupportedType("rope", f"cos and sin must have one dtype, got {cos.dtype} and {sin.dtype}")
    for name, t in (("q", q), ("cos", cos)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise UnsupportedType("rope", f"{name} dtype {t.dtype} is not one of {dtype_names(SUPPORTED_DTYPES)}")


def _check_fused(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _check(q, k, cos, sin)
    _check_dtypes(q, k, cos, sin)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.requires_grad:
            # rope would run its reference: exact, but nothing fused
            raise UnsupportedValue("rope", f"{name} requires grad; the fused op does not differentiate the tables")


def rope_supports(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """None when :func:`rope` runs its fused kernel for arguments like these, else the reason.

    The checks :func:`rope` raises on (shapes, devices, and the dtypes that the fused path
    needs), and whether cos/sin require grad (then it runs its reference instead), answered
    without raising; they read no tensor's values, so fake tensors (an fx node's example value)
    do. ``cos``/``sin`` are the op's [B, S, R] tables, before HF's unsqueeze on the head axis.
    """
    return refusal(_check_fused, q, k, cos, sin)


def _signature(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Everything :func:`_check` reads."""
    return (type(q), type(k), type(cos), type(sin), q.shape, k.shape, cos.shape, sin.shape,
            q.device, k.device, cos.device, sin.device)


def _dtypes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    return q.dtype, k.dtype, cos.dtype, sin.dtype


# Argument signatures that passed _check, and dtype combinations that passed _check_dtypes.
_VALID: set[tuple] = set()
_VALID_DTYPES: set[tuple] = set()


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, Hq, S, D] and k [B, Hk, S, D] by cos/sin [B, S, R].

    Same contract and values as :func:`rope_reference` (HF's ``apply_rotary_pos_emb``), up to
    rounding: the fused path computes in fp32 and rounds once, where HF rounds each product.
    ``R = cos.shape[-1] <= D`` is the rotary dim (partial rotary when ``R < D``); cos/sin may
    have batch (or sequence) size 1 and broadcast. Uses :class:`RoPEFunction` when the tensors
    are where Triton runs and cos/sin do not require grad; otherwise the reference (whose
    autograd gives the exact cos/sin gradients). Raises ValueError for bad shapes/devices and
    TypeError for dtypes the kernel does not support (float16, bfloat16, float32 are).
    """
    validate(_VALID, _signature, _check, q, k, cos, sin)
    if not use_triton(q, k, cos, sin) or cos.requires_grad or sin.requires_grad:
        return rope_reference(q, k, cos, sin)
    validate(_VALID_DTYPES, _dtypes, _check_dtypes, q, k, cos, sin)
    return RoPEFunction.apply(q, k, cos, sin)
