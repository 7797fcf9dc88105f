"""The cross-entropy pass on heads that scale the logits in the model dtype before the loss:
Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``. Same loss and
gradients as the original, and the report names the variant and the constant."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import COMMON, assert_same_training_step, batch, twin
from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig

import sloth_fx

CONFIGS = {
    "granite": (lambda: GraniteConfig(**COMMON, num_key_value_heads=4, logits_scaling=8.0), "divided", "/ 8.0"),
    "cohere": (lambda: CohereConfig(**COMMON, num_key_value_heads=4, logit_scale=0.0625), "multiplied", "* 0.0625"),
}


def scaled_head_model(family: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family][0](), attn_implementation="sdpa").to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


@pytest.mark.parametrize("family, num_items", [("granite", None), ("cohere", 17)])
def test_scaled_head_gets_the_fused_loss(family, num_items):
    original = scaled_head_model(family, torch.float32)
    optimized = sloth_fx.optimize(twin(original), passes=["cross_entropy"])
    inputs = batch() if num_items is None else {**batch(), "num_items_in_batch": torch.tensor(num_items)}
    assert_same_training_step(original, optimized, inputs, rtol=1e-5, atol=1e-6)
    assert sloth_fx.report(optimized).count("cross_entropy") == 1
    _, variant, constant = CONFIGS[family]
    assert f"{variant}_causal_lm_loss, logits {constant}" in sloth_fx.explain(optimized)


def test_scaled_head_in_bfloat16_scales_before_the_upcast():
    original = scaled_head_model("granite", torch.bfloat16)
    optimized = sloth_fx.optimize(twin(original), passes=["cross_entropy"])
    assert_same_training_step(original, optimized, batch(), rtol=1e-2, atol=1e-3)
    assert sloth_fx.report(optimized).count("cross_entropy") == 1
