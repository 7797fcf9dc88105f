"""PEFT's LoRA linears over a dense base, found in a captured graph.

PEFT's LoRA layer computes ``result = base_layer(x)``, then ``result + lora_B(lora_A(dropout(x))) *
scaling``, cast back to the base dtype (``torch_result_dtype``; the cast is absent from the graph
when adapters and base share a dtype). The adapter term is one pattern with the base's output as
a free input, ``base``; the base under it is recognised by patterns of its own, so that every
adapter form meets every base form:

- adapter forms: without dropout, or with ``lora_dropout`` (``dropout(x.to(A.dtype))``; a
  ``p = 0`` or ``training=False`` dropout that Dynamo recorded too); ``lora_B`` with a bias
  (``LoraConfig(lora_bias=True)``) or without;
- base forms: ``nn.Linear``'s ``F.linear(x, W, b)`` and a linear written as ``x @ W.T (+ b)``
  (Falcon's ``FalconLinear``), with a bias or without.

A LoRA linear is an adapter match whose ``base`` is a base match reading the same ``x``. Its
:class:`Match` binds ``x``, ``weight``, ``lora_a``, ``lora_b`` and, where present, ``bias`` (the
base's), ``lora_b_bias`` (the adapter's) and ``xd`` (the dropout's output, the adapters' input:
the dropout and the cast before it stay in the graph, so its random numbers are drawn as PEFT
draws them); ``literals`` ``scale``, ``adapter_dtype``, ``result_dtype`` (and ``p``,
``training``). An adapter term over any other base (a bitsandbytes 4-bit product is
``sloth_fx/passes/lora_4bit.py``'s) is not a match here.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.rewrite.pattern_variants import without
from sloth_fx.rewrite.patterns import Match, find_matches, trace_pattern


def peft_lora(base, x, lora_a, lora_b, lora_b_bias, scale, adapter_dtype, result_dtype):
    return (base + F.linear(F.linear(x.to(adapter_dtype), lora_a, None), lora_b, lora_b_bias) * scale).to(result_dtype)


def peft_lora_dropout(base, x, lora_a, lora_b, lora_b_bias, scale, p, training, adapter_dtype, result_dtype):
    dropped = F.dropout(x.to(adapter_dtype), p, training, False)
    return (base + F.linear(F.linear(dropped, lora_a, None), lora_b, lora_b_bias) * scale).to(result_dtype)


def linear_base(x, weight, bias):
    return F.linear(x, weight, bias)


def matmul_base(x, weight):
    return torch.matmul(x, weight.T)


def matmul_base_with_bias(x, weight, bias):
    return torch.matmul(x, weight.T) + bias


def _with_and_without(pattern, optional: str):
    return [pattern, without(pattern, [optional])]


ADAPTERS = [
    *_with_and_without(trace_pattern(peft_lora, ("scale", "adapter_dtype", "result_dtype")), "lora_b_bias"),
    *_with_and_without(trace_pattern(peft_lora_dropout, ("scale", "p", "training", "adapter_dtype", "result_dtype")),
                       "lora_b_bias"),
]
BASES = [*_with_and_without(trace_pattern(linear_base), "bias"), trace_pattern(matmul_base),
         trace_pattern(matmul_base_with_bias)]


def find_dense_lora(gm: fx.GraphModule) -> list[Match]:
    """Every PEFT LoRA linear over a dense base in ``gm`` (canonicalized), as the module doc says.

    With adapters in another dtype than the base the adapter pattern matches both at the cast
    back and, cast absent, at the sum it casts: the larger match (the one that takes the cast) is
    the linear. ``gm`` is not changed.
    """
    bases = {m.output: m for pattern in BASES for m in find_matches(gm.graph, pattern)}
    matches = []
    for pattern in ADAPTERS:
        for adapter in find_matches(gm.graph, pattern):
            base = bases.get(adapter.inputs["base"])
            if base is not None and base.inputs["x"] is adapter.inputs["x"]:
                matches.append(_joined(adapter, base))
    inner = {n for m in matches for n in m.nodes if n is not m.output}
    return [m for m in matches if m.output not in inner]


def _joined(adapter: Match, base: Match) -> Match:
    """One match of the adapter's sum and its base; a dropout stays in the graph (module doc)."""
    inputs = {name: node for name, node in adapter.inputs.items() if name != "base"} | base.inputs
    nodes = list(dict.fromkeys(base.nodes + adapter.nodes))
    dropouts = [n for n in nodes if n.target is F.dropout]
    if dropouts:
        (xd,) = dropouts
        kept = {xd} | {a for a in xd.args[:1] if a in nodes}
        nodes = [n for n in nodes if n not in kept]
        inputs["xd"] = xd
    return Match(adapter.pattern, adapter.output, inputs, dict(adapter.literals), nodes)
