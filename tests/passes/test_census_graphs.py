"""The censuses on small hand-written graphs: what they take for an unfused adapter, and what
they leave alone (a census that named everything would say nothing)."""

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sloth_fx.passes.lora_census import DORA, SPLIT, unfused_adapters


def in_module(node, path, kind=nn.Linear):
    node.meta["nn_module_stack"] = {path: (f"L['self'].{path}", kind)}
    return node


def adapter_graph(joined_to_base):
    """PEFT's ``base(x) + lora_B(lora_A(x)) * s`` (or the adapter term alone) in q_proj, over a
    base that keeps its weight as [in, out] (GPT-2's Conv1D does)."""
    graph = fx.Graph()
    x, w, a, b = (graph.placeholder(n) for n in ("x", "w", "a", "b"))
    base = in_module(graph.call_function(torch.matmul, (x, w)), "q_proj.base_layer")
    xa = in_module(graph.call_function(F.linear, (x, a, None)), "q_proj.lora_A.default")
    term = in_module(graph.call_function(F.linear, (xa, b, None)), "q_proj.lora_B.default")
    scaled = in_module(graph.call_function(torch.mul, (term, 2.0)), "q_proj")
    out = in_module(graph.call_function(torch.add, (base, scaled)), "q_proj") if joined_to_base else scaled
    graph.output(out)
    return graph


def test_an_adapter_left_unfused_is_named_by_its_layer():
    assert unfused_adapters(adapter_graph(joined_to_base=False), refused=[]) == [("q_proj", SPLIT)]
    (where, reason), = unfused_adapters(adapter_graph(joined_to_base=True), refused=[])
    assert where == "q_proj" and reason.startswith("PEFT's LoRA sum is over a base made by matmul in q_proj.base_layer")
    graph = adapter_graph(joined_to_base=True)
    match = [n for n in graph.nodes if n.op == "call_function"]
    assert unfused_adapters(graph, refused=match) == []  # a refused match says why itself


def test_a_norm_rescaling_the_adapter_is_dora():
    """DoRA's adapter share, ``(m / ||W + s*B*A||) * s * B(A(x))``, as a graph of its own."""
    graph = adapter_graph(joined_to_base=False)
    (scaled,) = [n for n in graph.nodes if n.target is torch.mul]
    (output,) = [n for n in graph.nodes if n.op == "output"]
    with graph.inserting_before(output):
        magnitude = graph.placeholder("magnitude")
        norm = graph.call_function(torch.linalg.norm, (magnitude,))
        rescaled = graph.call_function(torch.mul, (graph.call_function(operator.truediv, (magnitude, norm)), scaled))
    output.args = (rescaled,)
    assert unfused_adapters(graph, refused=[]) == [("q_proj", DORA)]
