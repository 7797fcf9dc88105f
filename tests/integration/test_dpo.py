"""An optimized tiny Llama or Mistral with PEFT LoRA under TRL's ``DPOTrainer``, with the adapters disabled
as the reference (no reference model) or with an optimized reference model: the un-optimized
run's losses and adapters.

The reference forward runs under ``no_grad``, so it takes the original eager forward; the
policy's decoder layers run their rewrites. TRL's own chunked head computes the log-probs.
"""

import pytest
from tiny_models import tiny_model, twin
from trainer_kit import SHARED_ARGS, FirstStepGradients, assert_same_training, preference_dataset, tokenizer

import sloth_fx

pytestmark = pytest.mark.full  # whole trainer runs: by CI's -m full step, not by default

trl = pytest.importorskip("trl")


def trained(model, reference, tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path / "run"), bf16=False, **SHARED_ARGS)
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=preference_dataset(),
                             processing_class=tokenizer(), callbacks=[FirstStepGradients()])
    trainer.train()
    return trainer


@pytest.mark.parametrize("with_reference", [False, True], ids=["adapters_off", "reference_model"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_dpo_matches_the_unoptimized_run(family, with_reference, tmp_path):
    original = tiny_model(family, lora=True)
    optimized = sloth_fx.optimize(twin(original))
    reference = tiny_model(family, seed=1) if with_reference else None
    optimized_reference = sloth_fx.optimize(twin(reference)) if with_reference else None
    assert_same_training(trained(original, reference, tmp_path), trained(optimized, optimized_reference, tmp_path),
                         tmp_path)
    report = sloth_fx.report(optimized)
    for name, sites in {"rmsnorm": 5, "rope": 4, "gated_mlp": 2, "lora": 14}.items():
        assert report.count(name) == sites, sloth_fx.explain(optimized)
