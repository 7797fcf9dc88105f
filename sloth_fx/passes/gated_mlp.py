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

from sloth_fx.rewrite.graph_edit import fake_value, replace_with_call
from sloth_fx.kernels.gated_mlp import gated_mlp, gated_mlp_supports
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.rewrite.patterns import Match, trace_pattern
from sloth_fx.rewrite.engine import Rewrite, Site, output_path

def swiglu(gate, up):
    return F.silu(gate) * up


def geglu_tanh(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def geglu(gate, up):
    return F.gelu(gate) * up


ACTIVATIONS = {"swiglu": "silu", "geglu_tanh": "gelu_tanh", "geglu": "gelu"}  # pattern -> the op's variant


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    (match,) = matches
    gate, up = match.inputs["gate"], match.inputs["up"]
    replace_with_call(gm.graph, [match.output], match.nodes, gated_mlp, (gate, up),
                      {"activation": ACTIVATIONS[match.pattern.name]})
    return [Site(output_path(match), f"{match.pattern.name}, width {fake_value(gate).shape[-1]}")]


def refusal(match: Match) -> str | None:
    gate, up = fake_value(match.inputs["gate"]), fake_value(match.inputs["up"])
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        return "no shape information for gate or up"
    reason = gated_mlp_supports(gate, up, ACTIVATIONS[match.pattern.name])
    if reason:
        return reason
    shared = match.outside_users()
    if shared:
        return f"the activation {shared[0].name} is also used outside the product"
    return None


register_pass("gated_mlp", Rewrite([trace_pattern(swiglu), trace_pattern(geglu_tanh), trace_pattern(geglu)], refusal, replace))
