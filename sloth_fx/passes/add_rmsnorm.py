"""Residual add + RMSNorm pass: ``rmsnorm(residual + x)`` -> ``add_rmsnorm``, norm and sum in one op.

HF's decoder layer adds the attention output to the residual and normalises the sum, which is
also the next residual::

    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)

The rmsnorm pass runs first and leaves ``rmsnorm(...)`` in place of the norm, so the pattern is
written over that op: passes compose. The sum keeps its other uses; they read the fused op's
second output. Opt-in: ``optimize(model, passes=[..., "rmsnorm", ..., "add_rmsnorm"])``. The
worked example of README's "Writing a pass".
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import fake_value, replace_with_call
from sloth_fx.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_supports
from sloth_fx.kernels.rmsnorm import rmsnorm
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.rewrite.patterns import Match, trace_pattern
from sloth_fx.rewrite.engine import Rewrite, Site, output_path

# Keep rmsnorm one call when the pattern is traced: it is the op the rmsnorm pass put in the graph.
fx.wrap("rmsnorm")


def residual_rmsnorm(residual, x, weight, eps, weight_offset, normed_dtype, out_dtype):
    """The pattern: the norm of a sum, as the graph holds it once the rmsnorm pass has run."""
    return rmsnorm(residual + x, weight, eps, weight_offset=weight_offset, normed_dtype=normed_dtype,
                   out_dtype=out_dtype)


LITERALS = ("eps", "weight_offset", "normed_dtype", "out_dtype")  # constants in the graph, not tensors


def refusal(match: Match) -> str | None:
    """Why this match must not be rewritten (the report prints it), or None. The op answers from
    the fake tensors Dynamo recorded: shapes, dtypes, devices."""
    x, residual, weight = (fake_value(match.inputs[name]) for name in ("x", "residual", "weight"))
    if not all(isinstance(t, torch.Tensor) for t in (x, residual, weight)):
        return "no shape information for the add's operands or the weight"
    return add_rmsnorm_supports(x, residual, weight, match.literals["eps"],
                                normed_dtype=match.literals["normed_dtype"], out_dtype=match.literals["out_dtype"])


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    """Put add_rmsnorm in place of the norm and of the sum: the sum's other users (the next
    residual) read its second output. The site takes over rmsnorm's, whose op is gone."""
    (match,) = matches
    norm, total = match.output, match.output.args[0]
    x = match.inputs["x"]
    args = (x, match.inputs["residual"], match.inputs["weight"], match.literals["eps"])
    kwargs = {name: match.literals[name] for name in LITERALS[1:]}
    replace_with_call(gm.graph, [norm, total], match.nodes, add_rmsnorm, args, kwargs)
    return [Site(output_path(match), f"the residual add fused into rmsnorm's op, hidden {fake_value(x).shape[-1]}",
                 takes_over="rmsnorm")]


register_pass("add_rmsnorm", Rewrite([trace_pattern(residual_rmsnorm, LITERALS)], refusal, replace))
