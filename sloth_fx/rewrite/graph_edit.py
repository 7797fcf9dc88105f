"""Putting a fused op in place of matched nodes, and where a node came from.

``replace_with_call`` swaps one or several matched outputs for a single ``call_function`` node:
with one output the new node takes the output's place; with several it returns a tuple and each
old output is replaced by a ``getitem`` of it. The new node goes right after the last of its
inputs, which is only valid if that is before the first use of any output: otherwise the
replacement is refused (it would need the graph reordered), never half-applied.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.fx as fx


class NotSchedulable(Exception):
    """The fused node cannot be placed after all its inputs and before all uses of its outputs."""


def fake_value(node: Any) -> Any:
    """The example value Dynamo recorded for a node (a FakeTensor), or the constant itself."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def module_path(node: fx.Node) -> str:
    """The module a node was traced in, relative to the captured region (``self_attn.q_proj``): the
    innermost module of the node's stack that is reached from the region's root. A module reached
    from elsewhere (a function that transformers made a hub-kernel module, named by a global,
    ``G['...apply_rotary_pos_emb']``) is not a place in the region: its caller is."""
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    # Dynamo names the region's root module "L['self']" or, for a compiled bound method, "...__self__"
    rooted = [path.rsplit(root, 1)[1] for path in stack for root in ("__self__", "L['self']") if root in path][-1:]
    path = rooted[0] if rooted else stack[-1] if stack else ""
    return path.replace("._modules['", ".").replace("']", "").lstrip(".")


def replace_with_call(
    graph: fx.Graph,
    outputs: Sequence[fx.Node],
    nodes: Iterable[fx.Node],
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any] | None = None,
) -> fx.Node:
    """Replace ``outputs`` (computed by ``nodes``) with ``fn(*args, **kwargs)``; erase what is dead."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = _flatten_nodes((args, kwargs or {}))
    covered = set(nodes) | set(outputs)
    first_use = min((order[u] for o in outputs for u in o.users if u not in covered), default=len(order))
    anchor = max(inputs, key=order.__getitem__, default=None)
    if anchor is not None and order[anchor] >= first_use:
        raise NotSchedulable("an input of the fused op is computed after a use of its output")
    insert_after = anchor if anchor is not None else next(iter(graph.nodes))
    if len(outputs) == 1 and all(order[i] < order[outputs[0]] for i in inputs):
        insert_after = outputs[0].prev
    with graph.inserting_after(insert_after):
        call = graph.call_function(fn, args, kwargs or {})
    _copy_meta(outputs, call)
    if len(outputs) == 1:
        outputs[0].replace_all_uses_with(call)
    else:
        with graph.inserting_after(call):
            items = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
        for item, old in zip(items, outputs):
            item.meta = dict(old.meta)
            old.replace_all_uses_with(item)
    erase_dead(graph, covered)
    return call


def erase_dead(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase those of ``nodes`` that nothing uses any more, last first."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=lambda n: order.get(n, -1), reverse=True):
        if node in order and not node.users and node.op != "placeholder":
            graph.erase_node(node)


def _flatten_nodes(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def _copy_meta(outputs: Sequence[fx.Node], call: fx.Node) -> None:
    first = outputs[0]
    call.meta.update({k: v for k, v in first.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    values = [o.meta.get("example_value") for o in outputs]
    call.meta["example_value"] = values[0] if len(outputs) == 1 else tuple(values)
