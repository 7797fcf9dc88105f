"""Canonicalize: one node form per operation, so that each pattern is written once.

- Python operators become torch functions: ``a * b`` (``operator.mul``) -> ``torch.mul``.
- Tensor methods with a torch function of the same meaning become that function:
  ``x.pow(2)`` -> ``torch.pow(x, 2)``; other methods become ``torch.Tensor.<name>`` calls.
- Casts take one spelling, ``torch.Tensor.to(x, dtype)``: ``x.float()``, ``x.half()``,
  ``x.bfloat16()`` and ``x.to(dtype=...)`` included.
- Calls of Python functions are bound to their signature: arguments positional where they can
  be, every default filled in (``F.silu(x)`` is ``F.silu(x, False)``, and
  ``F.dropout(x, p=0.1)`` is ``F.dropout(x, 0.1, True, False)``), so a pattern need not spell
  arguments as the graph did, and a literal binds to the default when the graph left it out.
- A cast to the dtype the value already has is dropped (``x.to(x.dtype)`` returns ``x`` itself, so
  dropping it changes nothing); patterns treat such casts as optional.

The result is still an ordinary executable graph.
"""

from __future__ import annotations

import inspect
import operator
from functools import lru_cache
from typing import Any

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import fake_value

CAST = torch.Tensor.to  # the one spelling of a dtype cast

OPERATORS = {
    operator.add: torch.add,
    operator.sub: torch.sub,
    operator.mul: torch.mul,
    operator.truediv: torch.div,
    operator.neg: torch.neg,
    operator.pow: torch.pow,
    operator.matmul: torch.matmul,
}
METHODS_AS_FUNCTIONS = {
    "add", "sub", "mul", "div", "neg", "pow", "mean", "sum", "rsqrt", "sqrt", "exp", "tanh",
    "sigmoid", "matmul", "reciprocal", "square", "abs", "cat",
}
DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def canonicalize_graph(graph: fx.Graph) -> int:
    """Rewrite ``graph`` in place into canonical form; returns how many nodes changed."""
    changed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in OPERATORS:
            node.target = OPERATORS[node.target]
            changed += 1
        elif node.op == "call_method":
            changed += _canonicalize_method(node)
        if node.op == "call_function" and node.target is CAST:
            changed += _canonicalize_cast(node)
        elif node.op == "call_function":
            changed += _normalize_python_call(node)
    return changed


def _normalize_python_call(node: fx.Node) -> int:
    """Bind a Python function's arguments to its signature: positional-or-keyword ones become
    positional, keyword-only ones keywords, every default filled in."""
    sig = _signature(node.target)
    if sig is None:
        return 0
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return 0
    bound.apply_defaults()
    args, kwargs = tuple(bound.args), dict(bound.kwargs)
    if args == tuple(node.args) and kwargs == dict(node.kwargs):
        return 0
    node.args, node.kwargs = args, kwargs
    return 1


@lru_cache(maxsize=None)
def _signature(fn: Any) -> inspect.Signature | None:
    if not inspect.isfunction(fn):
        return None
    sig = inspect.signature(fn)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return None
    return sig


def _canonicalize_method(node: fx.Node) -> int:
    name = node.target
    if name in DTYPE_METHODS and not node.kwargs and len(node.args) == 1:
        node.op, node.target, node.args = "call_function", CAST, (node.args[0], DTYPE_METHODS[name])
    elif name in METHODS_AS_FUNCTIONS:
        node.op, node.target = "call_function", getattr(torch, name)
    elif hasattr(torch.Tensor, name):
        node.op, node.target = "call_function", getattr(torch.Tensor, name)
    else:
        return 0
    return 1


def _canonicalize_cast(node: fx.Node) -> int:
    """``to(x, dtype=d)`` -> ``to(x, d)``; drop it where it does not change the dtype."""
    if "dtype" in node.kwargs and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        node.args, node.kwargs = (node.args[0], node.kwargs["dtype"]), {}
    if len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], torch.dtype):
        return 0
    source = fake_value(node.args[0])
    if isinstance(source, torch.Tensor) and source.dtype == node.args[1]:
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        return 1
    return 0


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """The pass form: canonicalize a GraphModule's graph and recompile it."""
    canonicalize_graph(gm.graph)
    gm.recompile()
    return gm
