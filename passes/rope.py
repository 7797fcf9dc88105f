"""RoPE pass: HF's ``apply_rotary_pos_emb`` on q and k -> one ``rope`` call for both.

The pattern is one rotation, ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x[..., h:], x[..., :h])``; the q and the k rotation of an attention block
share their ``cos``/``sin`` nodes, which is how they are paired into one fused launch. Both must
rotate the whole last axis split at its middle (``h = D/2``). Partial rotary (HF slices
``x[..., :rotary_dim]`` first) matches on the slice, so it is exact too. Interleaved layouts
(GPT-J's pairs ``2i, 2i+1``) are another graph and do not match.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from sloth_fx.graph_edit import NotSchedulable, module_path, replace_with_call
from sloth_fx.kernels.rope import rope
from sloth_fx.pass_manager import register_pass
from sloth_fx.patterns import Match, fake_value, find_matches, trace_pattern
from sloth_fx.report import PassLog

SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def rotary_embedding(x, cos, sin, half):
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


PATTERN = trace_pattern(rotary_embedding, ("half",))


@register_pass("rope")
def rope_pass(gm: fx.GraphModule, log: PassLog) -> fx.GraphModule:
    pairs: dict[tuple[fx.Node, fx.Node], list[Match]] = defaultdict(list)
    for match in find_matches(gm.graph, PATTERN):
        reason = _refusal(match)
        if reason:
            log.refuse(module_path(match.output), reason)
        else:
            pairs[(match.inputs["cos"], match.inputs["sin"])].append(match)
    for (cos, sin), matches in pairs.items():
        where = module_path(matches[0].output)
        if len(matches) != 2:
            log.refuse(where, f"{len(matches)} rotations share these cos/sin; the fused op rotates a q and a k pair")
            continue
        q, k = matches
        nodes = q.nodes + k.nodes + [cos, sin]
        try:
            replace_with_call(
                gm.graph, [q.output, k.output], nodes, rope,
                (q.inputs["x"], k.inputs["x"], cos.args[0], sin.args[0]),
            )
        except NotSchedulable as err:
            log.refuse(where, str(err))
            continue
        shape = fake_value(q.inputs["x"]).shape
        hk = fake_value(k.inputs["x"]).shape[1]
        log.rewrite(where, f"query rotation ({shape[1]} heads, head_dim {shape[-1]}), one launch with the key's")
        log.rewrite(where, f"key rotation ({hk} heads), one launch with the query's")
    return gm


def _refusal(match: Match) -> str | None:
    x = fake_value(match.inputs["x"])
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return "the rotated tensor is not [batch, heads, seq, head_dim]"
    if 2 * match.literals["half"] != x.shape[-1]:
        return f"rotate_half splits at {match.literals['half']}, not at the middle of {x.shape[-1]}"
    if x.dtype not in SUPPORTED:
        return f"dtype {x.dtype} is not one of float32, float16, bfloat16"
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
