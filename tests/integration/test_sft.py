"""An optimized tiny Llama or Mistral with PEFT LoRA under TRL's ``SFTTrainer``: plain, packed and
padding-free runs log the un-optimized run's losses and save the same adapters.

TRL 1.x puts its own chunked head on the model (``add_fused_lm_head``: per-token log-probs, never
the full logits) and computes the SFT loss from it, so sloth_fx's cross-entropy does not run there;
the decoder layers' rewrites do.
"""

import pytest
import torch
from tiny_models import tiny_model, twin
from trainer_kit import SHARED_ARGS, FirstStepGradients, assert_same_training, text_dataset, tokenizer

import sloth_fx
from sloth_fx.memory import token_chunks

pytestmark = pytest.mark.full  # whole trainer runs: by CI's -m full step, not by default

trl = pytest.importorskip("trl")

LAYER_REWRITES = {"rmsnorm": 5, "rope": 4, "gated_mlp": 2, "lora": 14}


def trained(model, tmp_path, **arguments):
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), **{**SHARED_ARGS, **arguments})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tokenizer(),
                            callbacks=[FirstStepGradients()])
    trainer.train()
    return trainer


@pytest.mark.parametrize("arguments", [
    {},
    {"packing": True, "max_length": 16},  # TRL's default bfd packing: padding-free rows with position ids
    {"padding_free": True, "max_length": None},
], ids=["plain", "packing", "padding_free"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sft_matches_the_unoptimized_run(family, arguments, tmp_path):
    arguments = {"bf16": False, **arguments}  # float32 model, float32 compute: see the next test for bf16
    original = tiny_model(family, lora=True)
    optimized = sloth_fx.optimize(twin(original))
    assert_same_training(trained(original, tmp_path, **arguments), trained(optimized, tmp_path, **arguments), tmp_path)
    report = sloth_fx.report(optimized)
    for name, sites in LAYER_REWRITES.items():
        assert report.count(name) == sites, sloth_fx.explain(optimized)


def test_sft_defaults_autocast_a_float32_base_and_explain_says_what_to_set(tmp_path):
    """SFTConfig's default bf16=True runs a float32 base under bfloat16 autocast: the LoRA linears
    then mix dtypes and are refused, and explain says to load the base in bfloat16 (or set bf16=False)."""
    original = tiny_model("llama", lora=True)
    optimized = sloth_fx.optimize(twin(original))
    assert_same_training(trained(original, tmp_path), trained(optimized, tmp_path), tmp_path)
    assert sloth_fx.report(optimized).count("lora") == 0
    assert "bf16=False" in sloth_fx.explain(optimized)


def test_sft_on_a_bfloat16_base_keeps_the_lora_rewrites(tmp_path):
    """The hint's fix: a bfloat16 base (PEFT keeps the adapters in float32) under the defaults."""
    original = tiny_model("llama", lora=True, dtype=torch.bfloat16)
    optimized = sloth_fx.optimize(twin(original))
    trainer = trained(optimized, tmp_path)
    assert sloth_fx.report(optimized).count("lora") == 14
    reference = trained(original, tmp_path)
    torch.testing.assert_close(torch.tensor(trainer.state.log_history[-2]["loss"]),
                               torch.tensor(reference.state.log_history[-2]["loss"]), rtol=2e-3, atol=0)


def test_sft_offloads_and_chunks_checkpointed_layers_under_trls_head(tmp_path, monkeypatch):
    """TRL's head calls the backbone itself, past sloth_fx's head gate: the decoder call still
    decides each step's offload and MLP chunks (of 8 tokens here), and the run is the un-optimized
    one's up to rounding."""
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", 8)
    arguments = {"bf16": False, "gradient_checkpointing": True}
    original = tiny_model("llama", lora=True, layers=4)  # more layers than offloading keeps on the device
    optimized = sloth_fx.optimize(twin(original), memory_budget=0)
    assert_same_training(trained(original, tmp_path, **arguments), trained(optimized, tmp_path, **arguments), tmp_path)
    text = sloth_fx.explain(optimized)
    assert "add_fused_lm_head" in text and "activation checkpointing, offload (latest)" in text, text
    assert "this forward moved" in text and "moved nothing" not in text, text  # it ran, not only was decided
    assert "this forward ran 4 MLPs over chunks of tokens" in text, text
