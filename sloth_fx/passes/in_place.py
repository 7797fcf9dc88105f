"""Writes in place into a fused op's output, and the copy that lets them happen.

The fused ops return views (of buffers made inside them), and autograd forbids writing into a
custom Function's view outputs. Where the graph writes into such an output in place (OLMo's
``query_states.clamp_(-clip_qkv, clip_qkv)`` into a LoRA linear's), :func:`in_place_writers`
finds the writes (through views of the output too) and :func:`copy_for_writes` gives every use of
the output a copy (``clone``) instead: exact, one ``[T, out]`` read and write, and its backward
passes the gradient through unchanged.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import fake_value
from sloth_fx.rewrite.graph_walk import op_name

def in_place_writers(node: fx.Node) -> list[fx.Node]:
    """The nodes that write in place into ``node``'s value or into a view of it.

    A view is a node whose example value shares ``node``'s storage (``view``, slicing, ``clamp_``'s
    own result, ...), followed from user to user; a node writes into the arguments that
    :func:`written_arguments` names.
    """
    storage = _storage(node)
    if storage is None:
        return []
    aliases, todo, writers = {node}, [node], []
    while todo:
        for user in todo.pop().users:
            if any(isinstance(w, fx.Node) and w in aliases for w in written_arguments(user)):
                writers.append(user)
            if user not in aliases and _storage(user) == storage:
                aliases.add(user)
                todo.append(user)
    return list(dict.fromkeys(writers))


AUGMENTED = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift")
IN_PLACE_OPERATORS = {getattr(operator, f"i{op}") for op in AUGMENTED} | {operator.setitem}
IN_PLACE_DUNDERS = {f"__i{op}__" for op in AUGMENTED} | {"__setitem__"}


def written_arguments(node: fx.Node) -> list[Any]:
    """The arguments ``node`` writes into: those its schema marks written for an aten op; ``self``
    for an in-place method or function (a name ending in ``_``: ``clamp_``, ``add_``; ``x += y``,
    ``x[i] = y``; ``inplace=True``); ``out=``."""
    if node.op not in ("call_method", "call_function"):
        return []
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        arguments = enumerate(target._schema.arguments)
        return [node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
                for i, a in arguments if a.alias_info is not None and a.alias_info.is_write]
    name = op_name(node)
    in_place = (name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_DUNDERS
    if in_place or target in IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return list(node.args[:1])
    return [node.kwargs["out"]] if "out" in node.kwargs else []


def _storage(node: fx.Node) -> int | None:
    """Which storage ``node``'s example value lives in (its address: the values are all alive)."""
    value = fake_value(node)
    return value.untyped_storage()._cdata if isinstance(value, torch.Tensor) else None


def copy_for_writes(graph: fx.Graph, output: fx.Node) -> None:
    """Give every use of the fused op's ``output`` a copy of it instead, which may be written in
    place (the output itself is a view that autograd forbids writing into)."""
    with graph.inserting_after(output):
        copy = graph.call_function(torch.Tensor.clone, (output,))
    copy.meta = dict(output.meta)
    output.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
