"""Patterns: plain PyTorch functions traced into small fx graphs, and a structural matcher.

A pattern is written as the reference computation, e.g.::

    def llama_rmsnorm(x, weight, eps, normed_dtype):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(normed_dtype)

Its arguments are *inputs* (bound to graph nodes: tensors) unless listed as *literals* (bound to
constants in the graph: eps, dtypes). Both the pattern and the captured graph are put into the
canonical form of ``sloth_fx/rewrite/canonicalize.py`` first, so one spelling serves ``x.pow(2)``,
``torch.pow(x, 2)`` and ``x ** 2``. The matcher then walks backwards from the pattern's output:

- commutative operations (add, mul) match with their two operands in either order;
- a dtype cast in the pattern may be absent from the graph (canonicalization drops casts that
  do nothing); its dtype literal is then bound to ``None``;
- a match whose intermediate values are used outside the match is refused, with the reason.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from sloth_fx.rewrite.canonicalize import CAST, canonicalize_graph

COMMUTATIVE = {torch.add, torch.mul, operator.add, operator.mul}


@dataclass(frozen=True)
class Pattern:
    """A traced pattern: its graph, its output node, and which placeholders are literals."""

    name: str
    graph: fx.Graph
    output: fx.Node
    literals: frozenset[str]

    @property
    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]


@dataclass
class Match:
    """One place where a pattern matched: bindings of its arguments and the graph nodes it covers."""

    pattern: Pattern
    output: fx.Node
    inputs: dict[str, fx.Node] = field(default_factory=dict)
    literals: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)

    def outside_users(self) -> list[fx.Node]:
        """Intermediate nodes of the match that something outside the match also uses."""
        inside = set(self.nodes)
        return [n for n in self.nodes if n is not self.output and any(u not in inside for u in n.users)]


def trace_pattern(fn: Callable[..., torch.Tensor], literals: Sequence[str] = ()) -> Pattern:
    """Trace ``fn`` with torch.fx into a canonical pattern graph."""
    gm = fx.symbolic_trace(fn)
    canonicalize_graph(gm.graph)
    names = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    unknown = set(literals) - names
    if unknown:
        raise ValueError(f"pattern {fn.__name__}: literals {sorted(unknown)} are not arguments of it")
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out.args[0]
    if not isinstance(result, fx.Node):
        raise ValueError(f"pattern {fn.__name__} must return a single tensor")
    return Pattern(fn.__name__, gm.graph, result, frozenset(literals))


def find_matches(graph: fx.Graph, pattern: Pattern) -> Iterator[Match]:
    """Every match of ``pattern`` in ``graph`` (anchored at each candidate output node)."""
    for node in graph.nodes:
        match = Match(pattern, node)
        if _match_node(pattern.output, node, match, pattern):
            match.nodes = list(dict.fromkeys(match.nodes))
            yield match


def _match_node(p: fx.Node, g: Any, m: Match, pattern: Pattern) -> bool:
    if p.op == "placeholder":
        return _bind(p.name, g, m, pattern)
    if not isinstance(g, fx.Node) or g.op != p.op or g.target != p.target:
        return _match_absent_cast(p, g, m, pattern)
    if len(g.args) != len(p.args) or set(g.kwargs) != set(p.kwargs):
        return False
    saved = _snapshot(m)
    orders = [p.args]
    if p.target in COMMUTATIVE and len(p.args) == 2:
        orders.append(p.args[::-1])
    for p_args in orders:
        _restore(m, saved)
        if all(_match_arg(pa, ga, m, pattern) for pa, ga in zip(p_args, g.args)) and all(
            _match_arg(p.kwargs[k], g.kwargs[k], m, pattern) for k in p.kwargs
        ):
            m.nodes.append(g)
            return True
    _restore(m, saved)
    return False


def _match_absent_cast(p: fx.Node, g: Any, m: Match, pattern: Pattern) -> bool:
    """A pattern cast ``x.to(dtype)`` with a literal dtype may be missing from the graph."""
    if p.target is not CAST or len(p.args) != 2:
        return False
    dtype = p.args[1]
    if not (isinstance(dtype, fx.Node) and dtype.op == "placeholder" and dtype.name in pattern.literals):
        return False
    saved = _snapshot(m)
    if _bind(dtype.name, None, m, pattern) and _match_arg(p.args[0], g, m, pattern):
        return True
    _restore(m, saved)
    return False


def _match_arg(p: Any, g: Any, m: Match, pattern: Pattern) -> bool:
    if isinstance(p, fx.Node):
        return _match_node(p, g, m, pattern)
    if isinstance(p, slice):
        return isinstance(g, slice) and all(
            _match_arg(a, b, m, pattern) for a, b in ((p.start, g.start), (p.stop, g.stop), (p.step, g.step))
        )
    if isinstance(p, (tuple, list)):
        return (
            isinstance(g, (tuple, list))
            and len(p) == len(g)
            and all(_match_arg(a, b, m, pattern) for a, b in zip(p, g))
        )
    return not isinstance(g, fx.Node) and type(p) is type(g) and p == g


def _bind(name: str, value: Any, m: Match, pattern: Pattern) -> bool:
    is_literal = name in pattern.literals
    table = m.literals if is_literal else m.inputs
    if is_literal == isinstance(value, fx.Node):
        return False
    if name in table:
        return table[name] is value or (is_literal and table[name] == value)
    table[name] = value
    return True


def _snapshot(m: Match) -> tuple[dict, dict, int]:
    return dict(m.inputs), dict(m.literals), len(m.nodes)


def _restore(m: Match, saved: tuple[dict, dict, int]) -> None:
    inputs, literals, n = saved
    m.inputs, m.literals = dict(inputs), dict(literals)
    del m.nodes[n:]

