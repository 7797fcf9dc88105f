"""The LoRA pass on tiny models: PEFT's loss and every adapter gradient, siblings grouped."""

import re

import pytest
import torch
from tiny_models import assert_same_training_step, batch, loss_and_grads, tiny_model, twin

import sloth_fx
import sloth_fx.kernels.lora_forms as lora_forms
from sloth_fx.kernels.lora_plan import LoRAPlan

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_on_all_seven_projections(family, checkpointing):
    original = tiny_model(family, lora=True, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("lora") == 7 * 2
    text = sloth_fx.explain(optimized)
    assert "x read once for 3 linears" in text and "x read once for 2 linears" in text
    # each projection's forms, as the cost model picks them and as the op took them for the step's tokens
    tokens = batch()["input_ids"].numel()
    forms = dict(re.findall(rf"cost model at {tokens} tokens for \S+?(\w+_proj): (forward \w+, dX \w+) \(", text))
    ran = dict(re.findall(rf"for \S+?(\w+_proj): .*; ran: (forward \w+, dX \w+) at {tokens} tokens", text))
    assert set(forms) == set(PROJECTIONS) and ran == forms


def test_each_model_explains_the_forms_its_own_groups_ran():
    """Two models of one shape in one process: each explain names the token counts it ran, not the other's."""
    original = tiny_model("llama", lora=True)
    first, second = (sloth_fx.optimize(twin(original), passes=["lora"]) for _ in range(2))
    loss_and_grads(first, batch(s=9))
    loss_and_grads(second, batch(s=13))
    first_text, second_text = sloth_fx.explain(first), sloth_fx.explain(second)
    assert "dX factored at 18 tokens" in first_text and "26 tokens" not in first_text
    assert "dX factored at 26 tokens" in second_text and "at 18 tokens" not in second_text


@pytest.fixture
def stacked_plans(monkeypatch):
    """The cost model picks stacked for every product of every linear it is asked about."""
    def stacked(*args, **kwargs):
        return LoRAPlan("stacked", "stacked", {"forward stacked": 1e-6, "dX stacked": 1e-6}, 0.0, "forced by the test")

    monkeypatch.setattr(lora_forms, "lora_plan", stacked)
    lora_forms.group_plans.cache_clear()
    yield
    lora_forms.group_plans.cache_clear()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stacked_forms_keep_peft_loss_and_gradients_and_are_explained(stacked_plans, checkpointing):
    """Every linear stacked (fp32 adapters on an fp32 model: PEFT's numbers), and explain says so
    for each projection, before and after the step."""
    original = tiny_model("llama", lora=True, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    assert_same_training_step(original, optimized, batch())
    text = sloth_fx.explain(optimized)
    for name in PROJECTIONS:
        assert re.search(rf"for \S+{name}: forward stacked, dX stacked \(.*; ran: forward stacked, dX stacked at", text)
    assert "forward factored" not in text


def test_every_pass_together_keeps_loss_and_gradients():
    original = tiny_model("mistral", lora=True, checkpointing=True)
    optimized = sloth_fx.optimize(twin(original), verify=True)
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert {p: report.count(p) for p in ("lora", "rmsnorm", "rope", "gated_mlp", "cross_entropy")} == {
        "lora": 14, "rmsnorm": 5, "rope": 4, "gated_mlp": 2, "cross_entropy": 1}
    assert "dropped by verify" not in sloth_fx.explain(optimized)


def test_fp32_adapters_on_a_half_model_take_the_cast_back_in():
    original = tiny_model("llama", lora=True, dtype=torch.float16)
    assert {p.dtype for n, p in original.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's default
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    assert_same_training_step(original, optimized, batch(), rtol=2e-2, atol=2e-3)
    report = sloth_fx.report(optimized)
    assert report.count("lora") == 14 and not report.refusals("lora")
