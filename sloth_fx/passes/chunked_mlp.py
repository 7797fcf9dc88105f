"""Chunked-MLP pass: a decoder layer's MLP runs over chunks of tokens, each chunk's forward run
again in backward, in the training steps whose memory budget calls for it.

At long rows a layer's peak is the MLP's ``[T x intermediate]`` activations (gate, up,
``act(gate) * up`` and their gradients), above all in the layer being recomputed under activation
checkpointing. This pass outlines the MLP, from its input ``x [..., hidden]`` to its output, into
a body graph (:mod:`sloth_fx.rewrite.outline`) and calls it through :func:`~sloth_fx.memory.token_chunks.chunk_in_step`.
In a step that chunks (:mod:`sloth_fx.memory.budget` decides per step: one layer's recompute
peak would be over a third of the budget) the body runs over chunks of ``CHUNK_TOKENS`` tokens,
saving only its inputs; backward runs each chunk's forward again and at once its backward, so
that one chunk's intermediates live at a time, forward or backward; the number of chunks comes
from the actual token count (the graph's sizes are symbolic). In every other step, and for a
batch of at most ``CHUNK_TOKENS`` tokens, the body runs as the MLP did. Chunked, outputs and the
input gradient are the unchunked values (up to rounding where a matrix product rounds a row
differently with another number of rows); weight and adapter gradients are the same per-token
sums, grouped by chunk (the maths is in :mod:`sloth_fx.memory.token_chunks`). Dropout inside
(``lora_dropout``) is replayed exactly in backward, but draws its masks chunk by chunk.

**The layer's recompute.** Where the graph is a whole checkpointed function that its recompute
replays op for op (a checkpoint's body with no selective policy:
:func:`~sloth_fx.memory.checkpoint.recompute_replays_whole`) and the MLP's output reaches nothing but the
graph's output, through sums only (the residual add), the recompute never reads that output: the
call is told so (``unread_width``) and the recompute skips the chunks, saving only their inputs.
The MLP then runs twice in a chunked step, as under plain checkpointing, instead of three times.
A graph of a layer checkpointed around its capture (older transformers) runs them in the
recompute too.

**Which nodes.** The MLP is the module with children ``gate_proj``, ``up_proj`` and ``down_proj``,
found by the nodes' ``nn_module_stack``: every computing node traced inside it. Run after the
other passes, the body holds their fused ops (the gate/up ``lora_linear_group``, ``gated_mlp``, the
down ``lora_linear``); passes run later rewrite inside the body too.

**Refused**, with the reason, never half-applied: an MLP of which this graph holds only some
projections (a graph break); an op not known to act on each token alone (a sum over tokens, a
reshape, ...: ``TOKEN_WISE`` lists those known); an intermediate read outside the MLP (more than
one value leaving it); no input or several inputs holding tokens (an input holds tokens when its
dims but the last are the output's); another input that is a size, or a tensor with a dimension
of the tokens' size (in a capture with static sizes a weight whose size happens to equal the
token count is refused too).

On by default, last (after the passes whose fused ops it outlines). Measured on an H200 with
PyTorch's allocator capped at 16 GiB (Llama-2-7B nf4, batch 1): chunked, 81,920 tokens trained
where unchunked 24,576 did not.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.rewrite.canonicalize import CAST
from sloth_fx.memory.checkpoint import recompute_replays_whole
from sloth_fx.rewrite.graph_edit import NotSchedulable, fake_value, module_path
from sloth_fx.kernels.gated_mlp import gated_mlp
from sloth_fx.kernels.lora import lora_linear, lora_linear_group
from sloth_fx.rewrite.outline import outline
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.report import PassLog
from sloth_fx.memory import token_chunks
from sloth_fx.memory.token_chunks import chunk_in_step

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Ops whose every output token is computed from the same token of their inputs alone.
TOKEN_WISE = {
    F.linear, F.silu, F.gelu, F.relu, F.dropout, torch.sigmoid, torch.tanh,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, CAST, torch.Tensor.clone, torch.Tensor.contiguous,
    lora_linear, lora_linear_group, gated_mlp,
}
_BODY = "sloth_fx_chunked_mlp_body"  # a body's meta flag: its MLP is outlined already


def chunked_mlp(gm: fx.GraphModule, log: PassLog) -> fx.GraphModule:
    """Outline each MLP of ``gm`` (module doc) into a call run over token chunks; log each site or refusal."""
    if gm.meta.get(_BODY):
        return gm
    for path, nodes in _mlps(gm.graph):
        found = _boundary(path, nodes)
        if isinstance(found, str):
            log.refuse(path, found)
            continue
        x, others, output = found
        unread = recompute_replays_whole(gm) and _summed_into_output(output)
        kwargs = {"unread_width": int(fake_value(output).shape[-1])} if unread else {}
        try:
            call, body = outline(gm, nodes, [x, *others], output, chunk_in_step, kwargs, "chunked_mlp_body")
        except NotSchedulable as err:
            log.refuse(path, str(err))
            continue
        body.meta[_BODY] = True
        # the call stands for the whole MLP: traced in it, not in down_proj, whose output it replaced
        stacks = (n.meta.get("nn_module_stack", {}) for n in nodes if module_path(n) == path)
        call.meta["nn_module_stack"] = next(stacks, {})
        ops = ", ".join(dict.fromkeys(_op_name(n) for n in nodes if n.target is not operator.getitem))
        recompute = ("not run again in the layer's recompute (its output is only summed into the layer's)" if unread
                     else "run again in the layer's recompute")
        log.rewrite(path, f"chunks of {token_chunks.CHUNK_TOKENS} tokens, each run again in backward, in steps whose "
                          f"memory budget calls for it; {recompute}; hidden {fake_value(x).shape[-1]}; outlined {ops}")
    return gm


def _mlps(graph: fx.Graph) -> list[tuple[str, list[fx.Node]]]:
    """Each module path with a projection child in ``graph``, and its computing nodes in graph order."""
    computing = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    roots: dict[str, None] = {}
    for node in computing:
        parts = module_path(node).split(".")
        roots.update({".".join(parts[:i]): None for i, part in enumerate(parts) if part in PROJECTIONS})
    return [(root, [n for n in computing if _inside(module_path(n), root)]) for root in roots]


def _inside(path: str, root: str) -> bool:
    return not root or path == root or path.startswith(root + ".")


def _boundary(path: str, nodes: list[fx.Node]) -> tuple[fx.Node, list[fx.Node], fx.Node] | str:
    """The MLP's token input, its other inputs and its output; or why it cannot run in chunks."""
    present = {part for n in nodes for part in module_path(n).split(".") if part in PROJECTIONS}
    if len(present) < len(PROJECTIONS):
        missing = ", ".join(p for p in PROJECTIONS if p not in present)
        return (f"no {missing} in this MLP's graph (only {', '.join(p for p in PROJECTIONS if p in present)}): "
                "its projections are fused otherwise (Phi-3's gate_up_proj) or split by a graph break")
    for node in nodes:
        if not _token_wise(node):
            return f"{node.name} ({_op_name(node)}) is not known to act on each token alone"
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        names = ", ".join(n.name for n in outputs) or "nothing"
        return f"{len(outputs)} values leave the MLP ({names}), not one: an intermediate is read outside it"
    (output,) = outputs
    out = fake_value(output)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return f"its output {output.name} is not a tensor of tokens"
    tokens = _dims(out.shape[:-1])
    inputs = list(dict.fromkeys(i for n in nodes for i in n.all_input_nodes if i not in inside))
    holding = [i for i in inputs if isinstance(v := fake_value(i), torch.Tensor) and v.dim() >= 2
               and _dims(v.shape[:-1]) == tokens]
    if len(holding) != 1:
        names = ", ".join(i.name for i in holding) or "none"
        return f"{len(holding)} of its inputs hold the output's tokens ({names}), not one"
    (x,) = holding
    token_sizes = {d for d in tokens if d != "1"}
    others = [i for i in inputs if i is not x]
    for other in others:
        value = fake_value(other)
        if not isinstance(value, torch.Tensor):
            return f"it reads {other.name}, which is not a tensor (a size?): a chunk would see the whole batch's"
        shared = token_sizes & set(_dims(value.shape))
        if shared:
            return (f"its input {other.name} {tuple(value.shape)} has the tokens' size {shared.pop()}: "
                    "each chunk would read it whole")
    return x, others, output


def _summed_into_output(node: fx.Node) -> bool:
    """``node``'s value reaches nothing but the graph's output, through sums only: nothing whose
    backward needs a value reads it (a sum's gradient is the incoming one)."""
    return all(user.op == "output" or (user.op == "call_function" and user.target is torch.add
                                       and _summed_into_output(user)) for user in node.users)


def _token_wise(node: fx.Node) -> bool:
    if node.target is operator.getitem:  # an output of a multi-output op, not an index into tokens
        return isinstance(node.args[0], fx.Node) and isinstance(fake_value(node.args[0]), (tuple, list))
    return node.op == "call_function" and node.target in TOKEN_WISE


def _dims(shape: torch.Size) -> tuple[str, ...]:
    """Sizes as text: a symbolic size is its symbol (compared without adding guards), a static one its value."""
    return tuple(str(d) for d in shape)


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


register_pass("chunked_mlp", chunked_mlp)
