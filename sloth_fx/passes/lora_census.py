"""Every PEFT adapter left in a graph after the LoRA pass, and why it was left.

The LoRA pass's patterns say why a *matched* linear is not fused. An adapter that matches no
pattern (DoRA, a base the patterns do not know, a layer split by a graph break) would pass in
silence. So after the rewrite the pass takes a census: PEFT computes an adapter inside its two
factor modules, ``lora_A`` and ``lora_B`` (every LoRA layer type names them so), and Dynamo
records in each node's ``nn_module_stack`` the module it was traced in. A node traced in a
``lora_A`` or ``lora_B`` module that is still in the graph belongs to an adapter that was not
fused: unless it lies in a match the pass refused (whose reason is logged already),
:func:`unfused_adapters` gives the adapter's layer and the reason, read from the graph:

- DoRA (``use_dora=True``): the adapter's output is rescaled by a factor computed from a norm (PEFT's
  ``magnitude / ‖W + s·B·A‖``), the adapter runs inside PEFT's ``lora_magnitude_vector``, or it
  forms its weight ``B·A`` as ``lora_B(lora_A(eye))`` (PEFT's way to the norm);
- a LoRA sum over a base that is not a linear the fused op computes: the op that made the base's
  value is named (GPT-2's ``Conv1D`` computes ``addmm(b, x, W)`` with ``W`` as ``[in, out]``);
- an adapter output that is never added to a base in this graph (Dynamo split PEFT's layer at a
  graph break; the part in the other graph gets its own entry).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.rewrite.canonicalize import CAST
from sloth_fx.rewrite.graph_edit import module_path
from sloth_fx.rewrite.graph_walk import made_by, op_name

FACTORS = ("lora_A", "lora_B")  # PEFT's modules of an adapter's two factors
DORA_MODULE = "lora_magnitude_vector"
NORMS = {"norm", "linalg_norm", "vector_norm", "linalg_vector_norm"}
# The root of a graph that began inside a layer (after a graph break) is a local or global name of
# its frame, which module_path leaves as "L['lora_A" (its "']" taken out with the others)
_FRAME_ROOT = re.compile(r"^[LG]\['(\w+)(?:'\])?")
_SEARCH = 6  # how many ops apart the adapter's output and the sum or the rescale may be

DORA = ("DoRA (use_dora=True): PEFT rescales each output feature of the LoRA sum by magnitude / ||W + s*B*A||, "
        "a weight norm the fused LoRA op does not compute (it would need a kernel of its own); "
        "PEFT's layer runs as it is")
SPLIT = ("the adapter's output leaves this graph without being added to its base layer's (Dynamo split PEFT's "
         "layer at a graph break), so base and adapter cannot be fused into one op")


def unfused_adapters(graph: fx.Graph, refused: Iterable[fx.Node]) -> list[tuple[str, str]]:
    """``(layer, reason)`` for each adapter computed in ``graph`` outside the nodes of the
    ``refused`` matches: ``layer`` is the LoRA layer's module path (``lora_A/lora_B`` in a graph
    that began inside the layer, where its path is not known)."""
    refused = set(refused)
    adapters: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        layer = _adapter_layer(node)
        if layer is not None and node.op == "call_function":
            adapters.setdefault(layer, []).append(node)
    return [(layer or "/".join(FACTORS), _reason(nodes)) for layer, nodes in adapters.items()
            if not refused.intersection(nodes)]


def _adapter_layer(node: fx.Node) -> str | None:
    """The module path of the LoRA layer whose adapter ``node`` was traced in, or None."""
    parts = _parts(node)
    for i, part in enumerate(parts):
        if part in FACTORS or part == DORA_MODULE:
            return ".".join(parts[:i])
    return None


def _parts(node: fx.Node) -> list[str]:
    path = _FRAME_ROOT.sub(r"\1", module_path(node))
    return path.split(".") if path else []


def _reason(nodes: list[fx.Node]) -> str:
    if any(DORA_MODULE in _parts(n) for n in nodes):
        return DORA
    if any(n.target is F.linear and isinstance(n.args[0], fx.Node) and op_name(n.args[0]) == "eye" for n in nodes):
        return DORA  # B·A formed as lora_B(lora_A(eye)): PEFT does so for DoRA's weight norm
    outputs = [n for n in nodes if n.target is F.linear and "lora_B" in _parts(n)]
    if any(_rescaled_by_norm(out) for out in outputs):
        return DORA
    for out in outputs:
        base = _base_of_sum(out)
        if base is not None:
            return (f"PEFT's LoRA sum is over a base made by {made_by(base)}: the fused op takes a linear base "
                    "(F.linear(x, W, b), or x @ W.T + b) reading the adapters' input")
    return SPLIT


def _downstream(node: fx.Node) -> list[fx.Node]:
    """The nodes at most ``_SEARCH`` uses after ``node``."""
    seen, frontier = [], [node]
    for _ in range(_SEARCH):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        seen += frontier
    return seen


def _upstream(node: fx.Node) -> set[fx.Node]:
    """The nodes at most ``_SEARCH`` inputs before ``node``."""
    seen, frontier = set(), [node]
    for _ in range(_SEARCH):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def _rescaled_by_norm(out: fx.Node) -> bool:
    """Whether the adapter output ``out`` is multiplied, a few ops on, by something computed
    from a norm (DoRA's ``magnitude / weight_norm``)."""
    for user in _downstream(out):
        if user.target is torch.mul:
            factors = [a for a in user.all_input_nodes if a is not out and out not in _upstream(a) | {a}]
            if any(n.op == "call_function" and op_name(n) in NORMS for f in factors for n in _upstream(f) | {f}):
                return True
    return False


def _base_of_sum(out: fx.Node) -> fx.Node | None:
    """The other operand of the sum that the adapter output ``out`` joins, through its scaling
    and casts, or None when no such sum is in the graph."""
    node = out
    for _ in range(_SEARCH):
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.target is torch.add and len(user.all_input_nodes) == 2:
            (base,) = [a for a in user.all_input_nodes if a is not node]
            return base
        if user.target not in (torch.mul, CAST):
            return None
        node = user
    return None
