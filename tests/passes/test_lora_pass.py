"""The LoRA pass on tiny models: PEFT's loss and every adapter gradient, siblings grouped."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx


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
    assert "cost model at" in text


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
