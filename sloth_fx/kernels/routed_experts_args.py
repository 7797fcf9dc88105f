"""The routed-experts op's arguments: :class:`ExpertProjection`, and the checks that
:func:`~sloth_fx.kernels.routed_experts.routed_experts` runs once per signature.

A stacked weight is dense (``[E, out, in]`` in hidden's dtype) or a bitsandbytes 4-bit weight
(:func:`~sloth_fx.kernels.toolkit.is_4bit`: packed storage whose quant state holds the
``[E, out, in]`` shape it was quantized from and the dtype it dequantizes to). Shapes are read with
:func:`~sloth_fx.kernels.toolkit.base_weight_shape`, so a 4-bit stack is checked by its quantized
shape. The checks read types, shapes, dtypes, devices and ``requires_grad``, never values (fake
tensors pass them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gated_mlp import ACTIVATIONS
from .toolkit import SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, base_weight_shape, dtype_names, is_4bit

__all__ = ["ExpertProjection", "check", "signature"]

OP = "routed_experts"
_DTYPES = (*SUPPORTED_DTYPES, torch.float64)  # float64 runs the references (the tests' exact path)


@dataclass(frozen=True)
class ExpertProjection:
    """One stacked projection of every expert: ``weight [E, out, in]`` (dense, or bitsandbytes
    4-bit quantized from that shape), and LoRA's ``lora_a [E, r, in]`` and ``lora_b [E, out, r]``
    (both or neither), any strides."""

    weight: torch.Tensor
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float = 1.0


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a stacked weight computes in: a 4-bit weight's dequantization dtype, else its own."""
    return weight.quant_state.dtype if is_4bit(weight) else weight.dtype


def check(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
          gate_up: ExpertProjection, down: ExpertProjection, activation: str) -> None:
    """Raise :class:`UnsupportedType` / :class:`UnsupportedValue` for arguments the op does not take."""
    if activation not in ACTIVATIONS:
        raise UnsupportedValue(OP, f"unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)}")
    for name, t in (("hidden", hidden), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if not isinstance(t, torch.Tensor):
            raise UnsupportedType(OP, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    projections = (("gate_up", gate_up), ("down", down))
    for name, proj in projections:
        if not isinstance(proj, ExpertProjection):
            raise UnsupportedType(OP, f"{name} must be an ExpertProjection, got {type(proj).__name__}")
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape \
            or top_k_index.shape[0] != hidden.shape[0]:
        raise UnsupportedValue(OP, f"hidden {tuple(hidden.shape)}, top_k_index {tuple(top_k_index.shape)} and "
                                   f"top_k_weights {tuple(top_k_weights.shape)} must be [T, H], [T, k] and [T, k]")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise UnsupportedType(OP, f"top_k_index is {top_k_index.dtype}, not int32 or int64")
    w1, w2, h = base_weight_shape(gate_up.weight), base_weight_shape(down.weight), hidden.shape[1]
    if len(w1) != 3 or len(w2) != 3 or w1[1] % 2 or (w1[0], w1[2]) != (w2[0], h) or w2[1:] != (h, w1[1] // 2):
        raise UnsupportedValue(OP, f"gate_up.weight {w1} and down.weight {w2} must be [E, 2I, {h}] and [E, {h}, I]")
    for name, proj in projections:
        if (proj.lora_a is None) != (proj.lora_b is None):
            raise UnsupportedValue(OP, f"{name} has one of lora_a and lora_b without the other")
        if proj.lora_a is not None:
            e, out, inp = base_weight_shape(proj.weight)
            a, b = proj.lora_a, proj.lora_b
            if a.dim() != 3 or tuple(a.shape[::2]) != (e, inp) or tuple(b.shape) != (e, out, a.shape[1]):
                raise UnsupportedValue(OP, f"{name}.lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} must be "
                                           f"[{e}, r, {inp}] and [{e}, {out}, r]")
    adapters = [t for _, proj in projections for t in (proj.lora_a, proj.lora_b) if t is not None]
    if any(t.device != hidden.device for t in (top_k_index, top_k_weights, gate_up.weight, down.weight, *adapters)):
        raise UnsupportedValue(OP, f"tensors on several devices (hidden on {hidden.device})")
    dtypes = [t.dtype for t in (hidden, top_k_weights, *adapters)] + [compute_dtype(p.weight) for _, p in projections]
    if any(d not in _DTYPES for d in dtypes):
        raise UnsupportedType(OP, f"floating dtypes must be among {dtype_names(_DTYPES)}")
    for name, proj in projections:
        _check_weight(name, proj.weight, hidden.dtype)


def _check_weight(name: str, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """A stacked weight computes in hidden's ``dtype``; a 4-bit one is frozen and dequantizes to it."""
    if not is_4bit(weight):
        if weight.dtype != dtype:
            raise UnsupportedType(OP, f"{name}.weight is {weight.dtype} and hidden {dtype}: they must match")
        return
    if weight.requires_grad:
        raise UnsupportedValue(OP, f"4-bit {name}.weight requires grad; a quantized weight cannot be trained")
    if weight.quant_state.dtype != dtype:
        raise UnsupportedType(OP, f"4-bit {name}.weight dequantizes to {weight.quant_state.dtype} and hidden is "
                                  f"{dtype}: quantize the experts from the dtype the model computes in")


def _key(t: torch.Tensor | None) -> tuple | None:
    """What :func:`check` reads of a weight or LoRA factor (a 4-bit weight by its quantized shape)."""
    if t is None:
        return None
    return type(t), base_weight_shape(t), compute_dtype(t), t.device, t.requires_grad


def signature(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              gate_up: ExpertProjection, down: ExpertProjection, activation: str) -> tuple:
    """Everything :func:`check` reads, without the token count."""
    rows = (hidden.shape[0] == top_k_index.shape[0] == top_k_weights.shape[0],)
    head = tuple((type(t), t.shape[1:], t.dim(), t.dtype, t.device) for t in (hidden, top_k_index, top_k_weights))
    parts = tuple(_key(t) for proj in (gate_up, down) for t in (proj.weight, proj.lora_a, proj.lora_b))
    return activation, type(gate_up), type(down), rows, head, parts
