"""The censuses on small hand-written graphs: what they take for a rotary embedding or an unfused
adapter, and what they leave alone (a census that named everything would say nothing)."""

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sloth_fx.passes.lora_census import DORA, SPLIT, unfused_adapters
from sloth_fx.passes.rotation_census import leftover_rotations
from sloth_fx.rewrite.canonicalize import canonicalize_graph

B, H, S, D = 1, 2, 3, 8


def traced(fn, **examples):
    """``fn`` traced, canonical, with an example value on every node (what Dynamo leaves there)."""
    gm = fx.symbolic_trace(fn)
    fx.passes.shape_prop.ShapeProp(gm).propagate(*examples.values())
    for node in gm.graph.nodes:
        if "tensor_meta" in node.meta:
            node.meta["example_value"] = torch.empty(node.meta["tensor_meta"].shape,
                                                     requires_grad=node.meta["tensor_meta"].requires_grad)
    canonicalize_graph(gm.graph)
    return gm.graph


X, COS, SIN = torch.randn(B, H, S, D), torch.randn(B, S, D), torch.randn(B, S, D)


def test_an_interleaved_rotation_is_named():
    def gptj(x, cos, sin):
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)

    ((where, reason),) = leftover_rotations(traced(gptj, x=X, cos=COS, sin=SIN), refused=[])
    assert reason.startswith("interleaved rotary embedding of 1 tensor (")


def test_a_half_split_rotation_in_another_form_is_named_as_such():
    def halves(x, cos, sin):
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        c, s = cos[..., :D // 2].unsqueeze(1), sin[..., :D // 2].unsqueeze(1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    graph = traced(halves, x=X, cos=COS, sin=SIN)
    ((where, reason),) = leftover_rotations(graph, refused=[])
    assert reason.startswith("rotary embedding of 1 tensor in another form than HF's")
    assert leftover_rotations(graph, refused=list(graph.nodes)) == []  # a refused match says why itself


def test_look_alikes_are_not_rotations():
    def mix(x, y, cos, sin):
        return x * cos.unsqueeze(1) + y * sin.unsqueeze(1)  # two tensors, not one rearranged

    def weighted(x, w1, w2):
        return x * w1 + (-x) * w2

    assert leftover_rotations(traced(mix, x=X, y=X.clone(), cos=COS, sin=SIN), refused=[]) == []
    trained = [torch.randn(D, requires_grad=True) for _ in range(2)]
    assert leftover_rotations(traced(weighted, x=X, w1=trained[0], w2=trained[1]), refused=[]) == []
    tables = [w.detach() for w in trained]  # the same sum over two tables is taken for one
    assert len(leftover_rotations(traced(weighted, x=X, w1=tables[0], w2=tables[1]), refused=[])) == 1


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
