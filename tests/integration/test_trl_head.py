"""TRL 1.x's SFTTrainer and DPOTrainer replace the causal-LM module's ``forward`` with their own
chunked head (``trl.trainer.utils.add_fused_lm_head``), which wraps whatever ``forward`` the module
had. sloth_fx's head gate sits exactly there: optimized first, the trainer's head replaces the
gate and ``explain`` says so; optimized after, sloth_fx leaves the trainer's head in place, says
so, and rewrites the layers.
"""

import pytest
from tiny_models import tiny_model
from trainer_kit import SHARED_ARGS, text_dataset, tokenizer

import sloth_fx

trl = pytest.importorskip("trl")


def sft_trainer(model, tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), bf16=False, **{**SHARED_ARGS, "max_steps": 1})
    return trl.SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tokenizer())


def test_explain_names_trls_head(tmp_path):
    model = sloth_fx.optimize(tiny_model("llama", lora=True))
    sft_trainer(model, tmp_path).train()
    text = sloth_fx.explain(model)
    assert "add_fused_lm_head" in text and "train with transformers.Trainer or a loop of your own" in text
    assert sloth_fx.report(model).count("lora") == 14


def test_optimize_after_the_trainer_keeps_trls_head(tmp_path):
    model = tiny_model("llama", lora=True)
    trainer = sft_trainer(model, tmp_path)
    sloth_fx.optimize(trainer.model)
    trainer.train()
    assert sloth_fx.report(model).count("lora") == 14
    text = sloth_fx.explain(model)
    assert "add_fused_lm_head" in text and "left as it is, unrewritten" in text
    assert "fused cross-entropy does not run" in text
