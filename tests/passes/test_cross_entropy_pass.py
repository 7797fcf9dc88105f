"""The cross-entropy pass on tiny models: HF's loss semantics kept exactly, logits never built."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_loss_and_gradients_match_with_lora(family):
    original = tiny_model(family, lora=True, checkpointing=True)
    optimized = sloth_fx.optimize(twin(original), passes=["cross_entropy"])
    assert_same_training_step(original, optimized, batch())
    assert sloth_fx.report(optimized).count("cross_entropy") == 1
    assert optimized(**batch()).logits is None


def test_gradient_accumulation_through_num_items_in_batch():
    original = tiny_model("llama", lora=True)
    optimized = sloth_fx.optimize(twin(original), passes=["cross_entropy"])
    inputs = {**batch(), "num_items_in_batch": torch.tensor(37)}
    assert_same_training_step(original, optimized, inputs)
    assert "reduction sum" in sloth_fx.explain(optimized)


def test_all_labels_ignored_gives_hf_value():
    original = tiny_model("llama", lora=True)
    optimized = sloth_fx.optimize(twin(original), passes=["cross_entropy"])
    inputs = batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    ref = original(**inputs).loss
    out = optimized(**inputs).loss
    assert torch.isnan(ref) == torch.isnan(out)


def test_evaluation_keeps_logits():
    model = sloth_fx.optimize(tiny_model("llama", lora=True), passes=["cross_entropy"])
    model.eval()
    with torch.no_grad():
        out = model(**batch())
    assert out.logits is not None and out.logits.shape[-1] == 101
