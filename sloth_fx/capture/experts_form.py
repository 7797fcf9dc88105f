"""What a routed-experts module computes, read from the module: the check of the experts rewrite.

transformers 5 builds the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and the models
made from the same parts as one module holding every expert's weights stacked in two parameters,
``gate_up_proj`` ``[experts, 2I, H]`` and ``down_proj`` ``[experts, H, I]``, and computes, for
``hidden [T, H]`` routed by ``top_k_index [T, k]`` with weights ``top_k_weights [T, k]``::

    out[t] = sum_j top_k_weights[t, j] * down_e(act(gate_e(h_t)) * up_e(h_t)),  e = top_k_index[t, j]

with ``gate | up`` the first and second halves of ``h_t · gate_up_proj[e]ᵀ``. The layout is stated
by flags that transformers' ``use_experts_implementation`` sets on the module: ``has_gate``,
``has_bias``, ``is_concatenated`` (gate then up, not interleaved), ``is_transposed`` and
``has_post_expert_norm``; and by its ``_apply_gate``. A module whose flags or gate differ (GPT-OSS:
biases, interleaved halves, a clamped gate) is refused by name.

PEFT puts LoRA on the stacked weights through ``target_parameters``: a ``ParamWrapper`` around the
module for each targeted parameter (nested when both are), with ``lora_A.weight [r·E, in]`` and
``lora_B.weight [out, r·E]``; expert ``e``'s update is ``scaling · B_e · A_e`` with
``A_e = lora_A.reshape(E, r, in)[e]`` and ``B_e = lora_B.reshape(out, r, E)[:, :, e]``. What is read
here are views of those parameters, so the fused op's gradients reach them.

A stack may be a bitsandbytes 4-bit weight (:func:`sloth_fx.quantize_experts`: packed 2-D storage
whose quant state holds the ``[experts, out, in]`` shape): its layout is read by that shape, and
the op dequantizes it. PEFT reads a stack's shape when it wraps it, so a stack quantized before
``get_peft_model`` has adapters built for its packed storage: refused, with the order to call in.

:func:`experts_layout` reads the layout and the activation once (they are the module's class and
config); :func:`experts_form` reads the adapters at each call (one can be switched off or changed
between calls) and returns the op's arguments, or the reason it cannot run them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sloth_fx.kernels.routed_experts import ExpertProjection
from sloth_fx.kernels.toolkit import base_weight_shape, is_4bit

_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}
PROJECTIONS = ("gate_up_proj", "down_proj")
# Flags of transformers' use_experts_implementation and the values the fused op computes.
_LAYOUT = {"has_gate": True, "has_bias": False, "is_concatenated": True, "has_post_expert_norm": False}


@dataclass(frozen=True)
class ExpertsForm:
    """The fused op's arguments for one call of a routed-experts module."""

    gate_up: ExpertProjection
    down: ExpertProjection
    activation: str

    def describe(self) -> str:
        """``"8 experts, silu, nf4, LoRA folded in (gate_up r=8, down r=8)"``: the 4-bit type only
        where the stacks are 4-bit (each stack's where they differ)."""
        projections = (("gate_up", self.gate_up), ("down", self.down))
        experts = base_weight_shape(self.gate_up.weight)[0]
        kinds = [p.weight.quant_state.quant_type if is_4bit(p.weight) else None for _, p in projections]
        if kinds[0] == kinds[1]:
            quantized = [kinds[0]] if kinds[0] else []
        else:
            quantized = [f"{name} {kind}" for (name, _), kind in zip(projections, kinds) if kind]
        lora = [f"{name} r={p.lora_a.shape[1]}" for name, p in projections if p.lora_a is not None]
        return ", ".join([f"{experts} experts", self.activation, *quantized,
                          f"LoRA folded in ({', '.join(lora)})" if lora else "no LoRA on the experts"])


@dataclass(frozen=True)
class ExpertsLayout:
    """A routed-experts module whose layout the fused op computes: the module holding the stacked
    weights, PEFT's wrappers around it by the parameter each adapts, and its activation."""

    base: nn.Module
    wrappers: dict[str, nn.Module]
    activation: str


def peft_wrappers(module: nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
    """PEFT's ``ParamWrapper`` chain around ``module`` by the parameter each adapts, and the module
    it wraps (``module`` itself when there is no wrapper)."""
    wrappers: dict[str, nn.Module] = {}
    base = module
    while hasattr(base, "parameter_name") and isinstance(getattr(base, "base_layer", None), nn.Module):
        wrappers[base.parameter_name] = base
        base = base.base_layer
    return wrappers, base


def experts_layout(module: nn.Module) -> ExpertsLayout | str:
    """The layout of ``module`` (an experts module, or PEFT's wrappers around one), or why the
    fused op computes something else."""
    wrappers, base = peft_wrappers(module)
    name = type(base).__name__
    refused = _layout_refusal(base)
    if refused:
        return f"{name}: {refused}"
    act_fn = getattr(base, "act_fn", None)
    activation = _activation(act_fn) if callable(act_fn) else None
    if activation is None:
        return f"{name}: its activation {type(act_fn).__name__} is none of {', '.join(_ACTIVATIONS)}"
    return ExpertsLayout(base, wrappers, activation)


def experts_form(layout: ExpertsLayout) -> ExpertsForm | str:
    """The fused op's arguments for a call of the module of ``layout``, with its adapters as they
    are now, or why they cannot be fused."""
    projections = {}
    transposed = getattr(layout.base, "is_transposed", False)
    for param_name in PROJECTIONS:
        weight = getattr(layout.base, param_name)
        wrapper = layout.wrappers.get(param_name)
        lora = _lora(wrapper, weight, transposed) if wrapper is not None else (None, None, 1.0)
        if isinstance(lora, str):
            return f"{type(layout.base).__name__}.{param_name}: {lora}"
        if transposed:
            weight = weight.transpose(-2, -1)  # stored [E, in, out]: the op reads [E, out, in]
        projections[param_name] = ExpertProjection(weight, *lora)
    return ExpertsForm(projections["gate_up_proj"], projections["down_proj"], layout.activation)


def _layout_refusal(base: nn.Module) -> str | None:
    """Why ``base`` is not the layout the fused op computes, or None."""
    missing = [p for p in PROJECTIONS if not isinstance(getattr(base, p, None), nn.Parameter)
               or len(base_weight_shape(getattr(base, p))) != 3]  # a 4-bit stack by its quantized shape
    if missing:
        return f"no stacked {' and '.join(missing)} parameter of three dims"
    packed = [p for p in PROJECTIONS if is_4bit(getattr(base, p))]
    if packed and getattr(base, "is_transposed", False):
        return f"4-bit {' and '.join(packed)} stored transposed ([E, in, out])"
    for flag, value in _LAYOUT.items():
        if getattr(base, flag, value) != value:
            return f"{flag}={getattr(base, flag)} (the fused op computes {flag}={value})"
    gate = getattr(type(base), "_apply_gate", None)
    if gate is not None and gate.__qualname__ != "_default_apply_gate":
        return f"its own gate {gate.__qualname__} (the fused op computes act(gate) * up)"
    return None


def _activation(act_fn: object) -> str | None:
    """Which of the op's activations ``act_fn`` computes, found by computing it."""
    probe = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    with torch.no_grad():
        try:
            got = act_fn(probe)
        except Exception:  # an activation that does not take a float64 CPU tensor is not one of ours
            return None
        return next((name for name, fn in _ACTIVATIONS.items()
                     if torch.allclose(got, fn(probe), rtol=1e-9, atol=1e-12)), None)


def adapter_mismatch(wrapper: nn.Module, weight: torch.Tensor, transposed: bool) -> str | None:
    """Why PEFT's ``wrapper`` holds adapters for another shape than the stack ``weight`` (three
    dims, or 4-bit quantized from three), or None. PEFT reads ``(experts, in, out)`` from the shape
    the parameter had when it wrapped it: ``[E, out, in]``, or ``[E, in, out]`` stored transposed."""
    e, d1, d2 = base_weight_shape(weight)
    expected = (e, d1, d2) if transposed else (e, d2, d1)
    built = (wrapper.num_experts, wrapper.in_features, wrapper.out_features)
    if built == expected:
        return None
    hint = (": PEFT wrapped the packed 4-bit storage; call sloth_fx.quantize_experts after get_peft_model"
            if is_4bit(weight) else "")
    return (f"an adapter for {built[0]} experts of {built[1]} -> {built[2]} features on a stack of "
            f"{e} experts of {expected[1]} -> {expected[2]}{hint}")


def _lora(wrapper: nn.Module, weight: torch.Tensor,
          transposed: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, float] | str:
    """The active adapter of PEFT's ``wrapper`` around ``weight``, as per-expert views
    ``(A [E, r, in], B [E, out, r], scaling)``; no LoRA where adapters are off; else why not."""
    if getattr(wrapper, "disable_adapters", False):
        return None, None, 1.0
    if getattr(wrapper, "merged_adapters", None):
        return "its adapters are merged into the weight"
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if not active:
        return None, None, 1.0
    if len(active) > 1:
        return f"{len(active)} adapters active at once ({', '.join(active)})"
    adapter = active[0]
    mismatch = adapter_mismatch(wrapper, weight, transposed)
    if mismatch:
        return mismatch
    experts = wrapper.num_experts
    a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    if wrapper.lora_B[adapter].bias is not None:
        return "its LoRA has a bias"
    a = a.reshape(experts, -1, a.shape[-1])  # PEFT's lora_A holds r·E rows for its E experts
    b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)
    return a, b, float(wrapper.scaling[adapter])
