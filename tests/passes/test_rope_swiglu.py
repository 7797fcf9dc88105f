"""RoPE and gated-MLP passes on tiny models: same loss and gradients, the expected sites, refusals."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, True)])
def test_rope_and_swiglu_keep_loss_and_gradients(family, lora, checkpointing):
    original = tiny_model(family, lora=lora, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["rope", "swiglu"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    # per layer: 2 RoPE sites (q and k, rotated by one launch) and 1 gated-MLP site
    assert report.count("rope") == 2 * 2
    assert report.count("swiglu") == 2
    assert all(site.endswith("self_attn") for site in report.sites("rope"))
    assert all(site.endswith("mlp") for site in report.sites("swiglu"))


def test_rope_with_per_row_positions():
    original = tiny_model("mistral", lora=True)
    optimized = sloth_fx.optimize(twin(original), passes=["rope"])
    inputs = batch(b=3, s=7)
    inputs["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3]])
    assert_same_training_step(original, optimized, inputs)
    assert sloth_fx.report(optimized).count("rope") == 2 * 2


def test_gelu_gated_mlp_is_not_swiglu():
    original = tiny_model("gemma")
    optimized = sloth_fx.optimize(twin(original), passes=["swiglu"])
    assert_same_training_step(original, optimized, batch())
    text = sloth_fx.explain(optimized)
    assert "geglu_tanh" in text and "swiglu," not in text
