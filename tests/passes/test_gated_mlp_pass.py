"""Gated-MLP pass on tiny models: same loss and gradients, one site per MLP, each variant by name."""

import pytest
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, True)])
def test_gated_mlp_keeps_loss_and_gradients(family, lora, checkpointing):
    original = tiny_model(family, lora=lora, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["gated_mlp"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("gated_mlp") == 2
    assert all(site.endswith("mlp") for site in report.sites("gated_mlp"))


def test_gelu_gated_mlp_is_not_swiglu():
    original = tiny_model("gemma")
    optimized = sloth_fx.optimize(twin(original), passes=["gated_mlp"])
    assert_same_training_step(original, optimized, batch())
    text = sloth_fx.explain(optimized)
    assert "geglu_tanh" in text and "swiglu," not in text
