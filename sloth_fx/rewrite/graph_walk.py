"""Where a value in a captured graph was made, in words for the report.

A pass that finds a computation it does not rewrite (a loss over logits it does not know, a LoRA
sum over a base it does not know) names what made the value in question. Casts, views, scalings
and the like take one tensor and leave the question open: :func:`maker` walks back through them to
the op that made the value, and :func:`made_by` says what that op is (:func:`op_name`) and where
it was traced.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import fake_value, module_path


def maker(node: fx.Node) -> fx.Node:
    """The first node back from ``node`` (itself included) that is not an op of exactly one
    tensor input: a graph input, or an op that combines tensors."""
    while node.op in ("call_function", "call_method"):
        tensors = [a for a in node.all_input_nodes if isinstance(fake_value(a), torch.Tensor)]
        if len(tensors) != 1:
            break
        node = tensors[0]
    return node


def made_by(node: fx.Node) -> str:
    """What made ``node``'s value, through :func:`maker`: ``"addmm in attn.c_attn.base_layer"``,
    or that it is an input of the graph (computed before it: in another graph, past a graph break)."""
    found = maker(node)
    if found.op == "placeholder":
        return "an input of this graph (computed before it, maybe in another graph past a graph break)"
    where = module_path(found)
    return f"{op_name(found)} in {where}" if where else op_name(found)


def op_name(node: fx.Node) -> str:
    """The name of ``node``'s op: ``addmm``, ``clamp_``, ``__iadd__``."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
