"""Gated-MLP pass: ``act(gate) * up`` -> ``gated_mlp`` (SwiGLU, and the GeGLU variants).

HF's MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. With ``silu`` that is SwiGLU;
Gemma's ``gelu_pytorch_tanh`` and plain ``gelu`` are GeGLU: each is its own exact variant of the
fused op (``activation=``), reported by name, and never rewritten as another. Any other
activation does not match.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.graph_edit import module_path, replace_with_call
from sloth_fx.kernels.swiglu import gated_mlp
from sloth_fx.pass_manager import register_pass
from sloth_fx.patterns import Match, fake_value, find_matches, trace_pattern
from sloth_fx.report import PassLog

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def swiglu(gate, up):
    return F.silu(gate) * up


def geglu_tanh(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def geglu(gate, up):
    return F.gelu(gate) * up


PATTERNS = [(trace_pattern(swiglu), "silu"), (trace_pattern(geglu_tanh), "gelu_tanh"), (trace_pattern(geglu), "gelu")]


@register_pass("swiglu")
def swiglu_pass(gm: fx.GraphModule, log: PassLog) -> fx.GraphModule:
    for pattern, activation in PATTERNS:
        for match in list(find_matches(gm.graph, pattern)):
            where = module_path(match.output)
            reason = _refusal(match)
            if reason:
                log.refuse(where, f"{pattern.name}: {reason}")
                continue
            gate, up = match.inputs["gate"], match.inputs["up"]
            replace_with_call(gm.graph, [match.output], match.nodes, gated_mlp, (gate, up), {"activation": activation})
            log.rewrite(where, f"{pattern.name}, width {fake_value(gate).shape[-1]}")
    return gm


def _refusal(match: Match) -> str | None:
    gate, up = fake_value(match.inputs["gate"]), fake_value(match.inputs["up"])
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        return "no shape information for gate or up"
    if gate.shape != up.shape:
        return f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape (broadcasting is not fused)"
    if gate.dtype != up.dtype or gate.dtype not in SUPPORTED:
        return f"dtypes {gate.dtype}/{up.dtype}: the fused op takes one dtype of float32, float16, bfloat16"
    shared = match.outside_users()
    if shared:
        return f"the activation {shared[0].name} is also used outside the product"
    return None
