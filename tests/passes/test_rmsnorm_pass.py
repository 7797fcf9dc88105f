"""RMSNorm pass on tiny models: same loss and gradients, Llama's and Gemma's forms as their own
variants, LayerNorm never matched."""

import pytest
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_rmsnorm_rewrite_keeps_loss_and_gradients(family, lora, checkpointing):
    original = tiny_model(family, lora=lora, checkpointing=checkpointing, layers=3)
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("rmsnorm") == 2 * 3 + 1
    assert any(site.endswith("layers.2.post_attention_layernorm") for site in report.sites("rmsnorm"))
    assert "rmsnorm: rewrote input_layernorm" in sloth_fx.explain(optimized)


def test_gemma_norm_is_its_own_variant():
    original = tiny_model("gemma")
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("rmsnorm") == 2 * 2 + 1
    assert "gemma_rmsnorm" in sloth_fx.explain(optimized)


def test_layernorm_model_gets_no_rmsnorm_rewrite():
    original = tiny_model("phi")
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    assert sloth_fx.report(optimized).count("rmsnorm") == 0
    assert "no rewrite applied" in sloth_fx.explain(optimized)
