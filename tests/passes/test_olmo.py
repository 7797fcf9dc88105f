"""OLMo with ``clip_qkv``: q, k and v are clamped in place, into what the fused LoRA op returns."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx
from sloth_fx.passes.lora import in_place_writers, written_arguments


def test_the_clip_is_active():
    model = tiny_model("olmo", lora=True)
    seen = []
    model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    model(**batch())
    clip = model.config.clip_qkv
    assert (seen[0].abs() > clip).float().mean() > 0.1  # a clamp that clips nothing would prove nothing


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_outputs_clamped_in_place_train_exactly(checkpointing):
    original = tiny_model("olmo", lora=True, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("lora") == 7 * 2 and not report.refusals("lora")
    copied = [line for line in sloth_fx.explain(optimized).splitlines() if "output copied for the in-place clamp_" in line]
    assert {line.split("rewrote ")[1].split()[0] for line in copied} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}


def test_every_pass_together_on_olmo():
    original = tiny_model("olmo", lora=True, checkpointing=True)
    optimized = sloth_fx.optimize(twin(original))
    assert_same_training_step(original, optimized, batch())
    assert sloth_fx.report(optimized).count("lora") == 7 * 2


def test_written_arguments_names_what_is_written():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    cases = [
        (g.call_method("clamp_", (x, -1, 1)), [x]),
        (g.call_function(torch.Tensor.clamp_, (x,), {"min": -1}), [x]),
        (g.call_function(torch.relu_, (y,)), [y]),
        (g.call_function(torch.ops.aten.add_.Tensor, (y, x)), [y]),
        (g.call_function(torch.ops.aten.add.out, (x, y), {"out": y}), [y]),  # a kwarg-only written argument
        (g.call_function(torch.add, (x, y), {"out": y}), [y]),
        (g.call_function(operator.iadd, (x, y)), [x]),  # Dynamo's x += y
        (g.call_function(operator.setitem, (x, 0, y)), [x]),
        (g.call_function(F.relu, (y,), {"inplace": True}), [y]),
        (g.call_method("clamp", (x, -1, 1)), []),
        (g.call_function(operator.add, (x, y)), []),
        (g.call_method("__add__", (x, y)), []),
    ]
    for node, expected in cases:
        assert written_arguments(node) == expected, node.format_node()


def test_writes_through_a_view_are_found_and_copies_are_not():
    t = torch.zeros(2, 6)
    g = fx.Graph()
    out = g.placeholder("out")
    view = g.call_method("view", (out, 12))
    through_view = g.call_method("clamp_", (view, -1, 1))
    fresh = g.call_function(operator.mul, (out, 2))
    into_fresh = g.call_method("add_", (fresh, 1))
    doubled = t * 2
    for node, value in ((out, t), (view, t.view(12)), (through_view, t.view(12)), (fresh, doubled), (into_fresh, doubled)):
        node.meta["example_value"] = value
    assert in_place_writers(out) == [through_view]
    assert in_place_writers(fresh) == [into_fresh]
