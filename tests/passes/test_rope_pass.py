"""RoPE pass on tiny models: same loss and gradients, q and k rotated by one launch per layer."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("lora,checkpointing", [(False, False), (True, True)])
def test_rope_keeps_loss_and_gradients(family, lora, checkpointing):
    original = tiny_model(family, lora=lora, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["rope"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("rope") == 2 * 2  # per layer: q and k, rotated by one launch
    assert all(site.endswith("self_attn") for site in report.sites("rope"))


def test_rope_with_per_row_positions():
    original = tiny_model("mistral", lora=True)
    optimized = sloth_fx.optimize(twin(original), passes=["rope"])
    inputs = batch(b=3, s=7)
    inputs["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3]])
    assert_same_training_step(original, optimized, inputs)
    assert sloth_fx.report(optimized).count("rope") == 2 * 2
