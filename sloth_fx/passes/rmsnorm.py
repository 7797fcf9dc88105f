"""RMSNorm pass: HF's Llama/Mistral RMSNorm and Gemma's ``(1 + w)`` variant -> ``rmsnorm``.

Llama and Mistral normalise in fp32, round the normalised value back to the input dtype, then
scale by the weight; Gemma scales by ``1 + w`` in fp32 and rounds once at the end. Each is its own
exact variant of the fused op (``normed_dtype``, ``weight_offset``). LayerNorm (mean subtraction)
has another graph and never matches.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import fake_value, replace_with_call
from sloth_fx.kernels.rmsnorm import rmsnorm, rmsnorm_supports
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.rewrite.patterns import Match, trace_pattern
from sloth_fx.rewrite.engine import Rewrite, Site, output_path

def llama_rmsnorm(x, weight, eps, compute_dtype, normed_dtype):
    h = x.to(compute_dtype)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(normed_dtype)


def gemma_rmsnorm(x, weight, eps, compute_dtype, weight_dtype):
    h = x.to(compute_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.to(weight_dtype))).type_as(x)


OFFSETS = {"gemma_rmsnorm": 1.0, "llama_rmsnorm": 0.0}  # the weight is scaled as offset + w


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    (match,) = matches
    x, weight = match.inputs["x"], match.inputs["weight"]
    out_dtype = fake_value(match.output).dtype
    replace_with_call(
        gm.graph, [match.output], match.nodes, rmsnorm, (x, weight, float(match.literals["eps"])),
        {"weight_offset": OFFSETS[match.pattern.name], "normed_dtype": match.literals.get("normed_dtype"),
         "out_dtype": out_dtype},
    )
    return [Site(output_path(match), f"{match.pattern.name}, hidden {fake_value(x).shape[-1]}, {fake_value(x).dtype}")]


def refusal(match: Match) -> str | None:
    """Why this match must not be rewritten, or None."""
    x, weight = fake_value(match.inputs["x"]), fake_value(match.inputs["weight"])
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return "no shape information for the input or the weight"
    compute = match.literals.get("compute_dtype")
    if compute not in (None, torch.float32) or (compute is None and x.dtype != torch.float32):
        return f"normalises in {compute or x.dtype}, the fused op normalises in float32"
    eps = match.literals.get("eps")
    if not isinstance(eps, (int, float)):
        return "eps is not a constant"
    reason = rmsnorm_supports(x, weight, eps, normed_dtype=match.literals.get("normed_dtype"),
                              out_dtype=fake_value(match.output).dtype)
    if reason:
        return reason
    shared = match.outside_users()
    if shared:
        return f"intermediate {shared[0].name} is also used outside the norm"
    return None


# Gemma's form first: the Llama pattern would also match inside it, with ``1 + w`` as the weight.
register_pass("rmsnorm", Rewrite(
    [trace_pattern(gemma_rmsnorm, ("eps", "compute_dtype", "weight_dtype")),
     trace_pattern(llama_rmsnorm, ("eps", "compute_dtype", "normed_dtype"))],
    refusal, replace,
))
