"""RoPE pass: HF's ``apply_rotary_pos_emb`` on q and k -> one ``rope`` call for both.

The pattern is one rotation, ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[..., h:], x[..., :h])``; the q and the k rotation of an attention block
share their ``cos``/``sin`` nodes, which is how they are paired into one fused launch. Both must
rotate the whole last axis split at its middle (``h = D/2``). Partial rotary (HF slices
``x[..., :rotary_dim]`` first) matches on the slice, so it is exact too. Interleaved layouts
(GPT-J's pairs ``2i, 2i+1``) are another graph and do not match: after the rewrite, every rotary
embedding left in the graph that no refused match covers is named with its reason
(``sloth_fx/passes/rotation_census.py``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import fake_value, replace_with_call
from sloth_fx.kernels.rope import rope, rope_supports
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.passes.rotation_census import leftover_rotations
from sloth_fx.rewrite.census import with_census
from sloth_fx.rewrite.patterns import Match, trace_pattern
from sloth_fx.rewrite.engine import Rewrite, Site, output_path


def rotary_embedding(x, cos, sin, half):
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def shared_tables(match: Match) -> tuple[fx.Node, fx.Node]:
    """The q and the k rotation of one attention block share their cos/sin nodes."""
    return match.inputs["cos"], match.inputs["sin"]


def pair_refusal(matches: list[Match]) -> str | None:
    if len(matches) != 2:
        return f"{len(matches)} rotations share these cos/sin; the fused op rotates a q and a k pair"
    q, k = matches
    cos, sin = shared_tables(q)
    return rope_supports(*(fake_value(n) for n in (q.inputs["x"], k.inputs["x"], cos.args[0], sin.args[0])))


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    q, k = matches
    cos, sin = shared_tables(q)
    replace_with_call(
        gm.graph, [q.output, k.output], q.nodes + k.nodes + [cos, sin], rope,
        (q.inputs["x"], k.inputs["x"], cos.args[0], sin.args[0]),
    )
    where, shape = output_path(q), fake_value(q.inputs["x"]).shape
    return [Site(where, f"query rotation ({shape[1]} heads, head_dim {shape[-1]}), one launch with the key's"),
            Site(where, f"key rotation ({fake_value(k.inputs['x']).shape[1]} heads), one launch with the query's")]


def refusal(match: Match) -> str | None:
    x = fake_value(match.inputs["x"])
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return "the rotated tensor is not [batch, heads, seq, head_dim]"
    if 2 * match.literals["half"] != x.shape[-1]:
        return f"rotate_half splits at {match.literals['half']}, not at the middle of {x.shape[-1]}"
    for name in ("cos", "sin"):
        node = match.inputs[name]
        table = fake_value(node)
        unsqueezed = node.target is torch.Tensor.unsqueeze and node.args[1:] == (1,)
        if not unsqueezed or table.dim() != 4 or table.shape[-1] != x.shape[-1]:
            return f"{name} is not a [batch, seq, head_dim] table unsqueezed on the head axis"
        if table.requires_grad:
            return f"{name} requires grad; the fused op does not differentiate the tables"
    shared = match.outside_users()
    if shared:
        return f"intermediate {shared[0].name} is also used outside the rotation"
    return None


register_pass("rope", with_census(
    Rewrite([trace_pattern(rotary_embedding, ("half",))], refusal, replace, group=shared_tables,
            check_group=pair_refusal),
    leftover_rotations,
))
