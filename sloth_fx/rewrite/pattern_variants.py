"""Variants of a pattern where an optional argument is absent.

A module's optional tensor (a linear's bias, an adapter's bias) reaches the captured graph as
``None`` when it is absent: ``F.linear(x, w, None)``. Rather than writing the pattern twice,
write it once with the argument and derive the variant without it: :func:`without` puts the
constant ``None`` where the pattern read the argument, so the variant matches exactly the graphs
that pass ``None`` there, and binds nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx

from sloth_fx.rewrite.patterns import Pattern


def without(pattern: Pattern, names: Sequence[str]) -> Pattern:
    """``pattern`` with its inputs ``names`` replaced by the constant ``None`` (same name: the
    report names the computation, not the variant). ``pattern`` itself is left as it is."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(pattern.graph, env))
    for name in names:
        (placeholder,) = [n for n in graph.nodes if n.op == "placeholder" and n.target == name]
        if name in pattern.literals:
            raise ValueError(f"pattern {pattern.name}: {name} is a literal; only inputs can be left out")
        for user in list(placeholder.users):
            user.args = fx.node.map_arg(user.args, lambda n: None if n is placeholder else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n: None if n is placeholder else n)
        graph.erase_node(placeholder)
    return Pattern(pattern.name, graph, env[pattern.output], pattern.literals)
