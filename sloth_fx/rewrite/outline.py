"""Outlining: a part of a graph becomes a graph of its own, called where the part was.

:func:`outline` moves the nodes that compute one value into a new ``GraphModule``, attached to the
graph's module and read by a ``get_attr`` node, and puts one call ``fn(body, *inputs, **kwargs)``
in the value's place. ``body(*inputs)`` computes what the nodes computed, so ``fn`` decides how
the part runs (over chunks of tokens, say: :mod:`sloth_fx.memory.token_chunks`). The pass manager enters
graphs read by ``get_attr`` nodes, so passes that run later rewrite inside the body too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from sloth_fx.rewrite.graph_edit import NotSchedulable, replace_with_call


def outline(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], output: fx.Node,
            fn: Callable[..., Any], kwargs: dict[str, Any], name: str) -> tuple[fx.Node, fx.GraphModule]:
    """Move ``nodes`` (in graph order; they compute ``output`` from ``inputs`` and nothing outside
    reads them but through ``output``) into a body ``gm.<name>_<i>`` taking ``inputs`` in order,
    and replace ``output`` with ``fn(body, *inputs, **kwargs)``; the call node and the body.

    Raises :class:`~sloth_fx.rewrite.graph_edit.NotSchedulable` (the graph unchanged) when the call
    cannot be placed after all ``inputs`` and before the first use of ``output``.
    """
    body = fx.GraphModule(gm, _body_graph(nodes, inputs, output))
    attr_name = _free_name(gm, name)
    gm.add_submodule(attr_name, body)
    with gm.graph.inserting_before(nodes[0]):
        attr = gm.graph.get_attr(attr_name)
    try:
        call = replace_with_call(gm.graph, [output], nodes, fn, (attr, *inputs), kwargs)
    except NotSchedulable:
        gm.graph.erase_node(attr)
        delattr(gm, attr_name)
        raise
    return call, body


def _body_graph(nodes: Sequence[fx.Node], inputs: Sequence[fx.Node], output: fx.Node) -> fx.Graph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)  # its example value, for the checks of passes that run inside
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[output])
    return graph


def _free_name(gm: fx.GraphModule, name: str) -> str:
    i = 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    return f"{name}_{i}"
