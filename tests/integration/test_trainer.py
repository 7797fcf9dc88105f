"""An optimized tiny Llama or Mistral with PEFT LoRA under ``transformers.Trainer``: the same losses and
saved adapters as the un-optimized model's run, with every rewrite in place, the fused loss included."""

import pytest
from tiny_models import tiny_model, twin
from trainer_kit import SHARED_ARGS, FirstStepGradients, assert_same_training, token_dataset
from transformers import Trainer, TrainingArguments

import sloth_fx
from sloth_fx.memory import token_chunks

pytestmark = pytest.mark.full  # whole trainer runs: by CI's -m full step, not by default


def trained(model, tmp_path, **arguments) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "run"), **{**SHARED_ARGS, **arguments})
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=[FirstStepGradients()])
    trainer.train()
    return trainer


@pytest.mark.parametrize("arguments", [
    {},  # defaults: remove_unused_columns=True reads the forward's signature
    {"gradient_accumulation_steps": 2},  # the loss is summed and divided by num_items_in_batch
    {"gradient_checkpointing": True},  # enabled by Trainer after optimize
], ids=["defaults", "accumulation", "checkpointing"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_trainer_matches_the_unoptimized_run(family, arguments, tmp_path):
    original = tiny_model(family, lora=True)
    optimized = sloth_fx.optimize(twin(original))
    assert_same_training(trained(original, tmp_path, **arguments), trained(optimized, tmp_path, **arguments), tmp_path)
    report = sloth_fx.report(optimized)
    for name, sites in {"rmsnorm": 5, "rope": 4, "gated_mlp": 2, "lora": 14, "cross_entropy": 1}.items():
        assert report.count(name) == sites, sloth_fx.explain(optimized)
    if "gradient_accumulation_steps" in arguments:
        assert "reduction sum" in sloth_fx.explain(optimized)


def test_trainer_checkpointing_with_kept_activations_matches_the_unoptimized_run(tmp_path):
    """A budget the steps fit in: Trainer enables checkpointing, each step keeps its activations
    instead of recomputing, and the training is still the un-optimized run's."""
    original = tiny_model("llama", lora=True, lora_dropout=0.1)
    optimized = sloth_fx.optimize(twin(original), memory_budget=2**40)
    arguments = {"gradient_checkpointing": True}
    assert_same_training(trained(original, tmp_path, **arguments), trained(optimized, tmp_path, **arguments), tmp_path)
    text = sloth_fx.explain(optimized)
    assert "activation checkpointing, keep (latest)" in text and "activation checkpointing, recompute" not in text
    assert "this forward ran 2 checkpointed layers without a recompute" in text


def test_trainer_with_chunked_steps_matches_the_unoptimized_run(tmp_path, monkeypatch):
    """A budget of 0 bytes: Trainer enables checkpointing, each step recomputes (two layers:
    offloading would keep as much) and runs its MLPs in chunks of 8 tokens (rows of 12 over a
    batch: several chunks), and the training is the un-optimized run's up to rounding."""
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", 8)
    original = tiny_model("llama", lora=True)
    optimized = sloth_fx.optimize(twin(original), memory_budget=0)
    arguments = {"gradient_checkpointing": True}
    assert_same_training(trained(original, tmp_path, **arguments), trained(optimized, tmp_path, **arguments), tmp_path)
    text = sloth_fx.explain(optimized)
    assert "activation checkpointing, recompute (latest)" in text and "MLPs run over chunks of 8 tokens" in text
    assert "this forward ran 2 MLPs over chunks of tokens" in text
