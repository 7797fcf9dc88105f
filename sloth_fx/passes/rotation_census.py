"""Rotary embeddings left in a graph after the rope pass, and why they were left.

The rope pass matches HF's ``x * cos + rotate_half(x) * sin``. A rotary embedding written another
way matches nothing, so nothing would say that it runs as it was. After the rewrite the pass
looks for what every rotary embedding computes, whatever its layout: a sum (or difference) of
two products ``a * C ± b * S`` where

- ``C`` and ``S`` are *tables*: two different graph inputs of one shape, needing no grad, reached
  through indexing, unsqueezing, repeating and casts only (the cos and sin a model computes once
  per step and hands every layer);
- ``a`` and ``b`` are two different rearrangements of one tensor ``x`` (slices, negation,
  concatenation, stacking, reshapes, casts: ``x`` and ``rotate_half(x)``, or its even and odd
  features).

:func:`leftover_rotations` names each module holding such a sum outside the rope matches the pass
refused (their reasons are logged already), with the reason: an interleaved layout (features
``2i`` and ``2i + 1`` rotate as a pair: strided slices or a stack of ``x``, or a table repeated
element-wise) needs a kernel variant the fused rope op does not have (it rotates the halves ``i``
and ``i + D/2``); any other form is named as not HF's.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

from sloth_fx.rewrite.canonicalize import CAST
from sloth_fx.rewrite.graph_edit import fake_value, module_path

TABLE_OPS = {torch.Tensor.unsqueeze, operator.getitem, torch.Tensor.repeat_interleave, torch.repeat_interleave, CAST,
             torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.expand, torch.Tensor.contiguous}
ARRANGE_OPS = {operator.getitem, torch.neg, torch.Tensor.flatten, torch.flatten, torch.Tensor.view,
               torch.Tensor.reshape, torch.Tensor.transpose, torch.transpose, torch.Tensor.contiguous, CAST,
               torch.Tensor.split, torch.split, torch.Tensor.unflatten}
JOIN_OPS = {torch.cat, torch.stack}
REPEATS = {torch.Tensor.repeat_interleave, torch.repeat_interleave}

INTERLEAVED = ("interleaved rotary embedding of {n} (features 2i and 2i+1 rotate as a pair): the fused rope op "
               "rotates the halves i and i+D/2, as HF's rotate_half lays them out; an interleaved layout would need a "
               "kernel variant of its own, so they rotate as the model wrote them")
OTHER_FORM = ("rotary embedding of {n} in another form than HF's x*cos + rotate_half(x)*sin (the rope pattern), "
              "so they rotate as the model wrote them")


def leftover_rotations(graph: fx.Graph, refused: Iterable[fx.Node]) -> list[tuple[str, str]]:
    """``(module, reason)`` for each module of ``graph`` that rotates tensors by cos/sin tables
    outside the nodes of the ``refused`` matches (the module doc); the reason counts them."""
    refused = set(refused)
    found: dict[str, dict[fx.Node, bool]] = {}  # module -> rotated tensor -> interleaved
    for node in graph.nodes:
        if node in refused or node.op != "call_function" or node.target not in (torch.add, torch.sub):
            continue
        rotation = _rotation(node)
        if rotation is not None:
            x, interleaved = rotation
            rotated = found.setdefault(module_path(node), {})
            rotated[x] = rotated.get(x, False) or interleaved
    return [(where, (INTERLEAVED if any(rotated.values()) else OTHER_FORM).format(
        n=f"{len(rotated)} tensor{'s' if len(rotated) > 1 else ''}")) for where, rotated in found.items()]


def _rotation(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """``(x, interleaved)`` when ``node`` is ``a * C ± b * S`` as the module doc says, else None."""
    products = [a for a in node.args if isinstance(a, fx.Node) and a.target is torch.mul]
    if len(products) != 2 or len(node.args) != 2:
        return None
    sides = [_split_product(p) for p in products]
    if None in sides:
        return None
    (a, table_c, via_c), (b, table_s, via_s) = sides
    c, s = fake_value(table_c), fake_value(table_s)
    if table_c is table_s or a is b or getattr(c, "shape", None) != getattr(s, "shape", None):
        return None
    source_a, source_b = _source(a), _source(b)
    if source_a is None or source_a[0] is not source_b[0]:
        return None
    arranged = source_a[1] + source_b[1]
    interleaved = any(_strided(n) or n.target is torch.stack for n in arranged) or any(
        n.target in REPEATS for n in via_c + via_s)
    return source_a[0], interleaved


def _split_product(product: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | None:
    """``(factor, table, nodes from the table to the product)`` of a product of something by a table."""
    if len(product.args) != 2 or not all(isinstance(a, fx.Node) for a in product.args):
        return None
    for factor, other in (product.args, product.args[::-1]):
        table = _table(other)
        if table is not None:
            return factor, *table
    return None


def _table(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The graph input ``node`` is reached from through table ops, needing no grad, and those ops."""
    passed = []
    while node.op == "call_function" and node.target in TABLE_OPS and isinstance(node.args[0], fx.Node):
        passed.append(node)
        node = node.args[0]
    value = fake_value(node)
    if node.op != "placeholder" or not isinstance(value, torch.Tensor) or value.requires_grad:
        return None
    return node, passed


def _source(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The tensor ``node`` rearranges (through arrangement ops; every part of a join from one
    tensor) and the ops passed, or None when a join's parts come from different tensors."""
    if node.op != "call_function":
        return node, []
    if node.target in JOIN_OPS and isinstance(node.args[0], (list, tuple)):
        parts = [_source(p) for p in node.args[0] if isinstance(p, fx.Node)]
        if not parts or None in parts or len({p[0] for p in parts}) != 1:
            return None
        return parts[0][0], [node, *(n for p in parts for n in p[1])]
    if node.target in ARRANGE_OPS and isinstance(node.args[0], fx.Node) and _rearranges(node):
        found = _source(node.args[0])
        return None if found is None else (found[0], [node, *found[1]])
    return node, []


def _rearranges(node: fx.Node) -> bool:
    """Whether ``node`` rearranges its first argument: an item of a tuple is one only where the
    tuple is a split of one tensor (the outputs of a grouped op are tensors apart)."""
    if node.target is not operator.getitem:
        return True
    indexed = node.args[0]
    return isinstance(fake_value(indexed), torch.Tensor) or indexed.target in (torch.Tensor.split, torch.split)


def _strided(node: fx.Node) -> bool:
    """An indexing of every other feature (``x[..., ::2]``, ``x[..., 1::2]``)."""
    if node.target is not operator.getitem:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return any(isinstance(i, slice) and i.step == 2 for i in index)
