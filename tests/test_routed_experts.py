"""MoE models' routed experts run outside the capture: every layer is captured once and rewritten,
trains as transformers and PEFT train it, and explain says why the experts are not fused.

Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE, OLMoE and GPT-OSS (router and expert
biases), tiny and random; each plain, with LoRA on attention and on the experts (PEFT's
``target_parameters``), with activation checkpointing, and with both. Before, every step routed
otherwise captured the layers again (a tiny Mixtral: 35 captures in six steps, then Dynamo's
recompile limit).
"""

import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tiny_models import assert_same_training_step, batch, loss_and_grads, twin

import sloth_fx
from sloth_fx.capture.install import uninstall
from sloth_fx.capture.routed_experts import EagerExperts, routed_experts
from sloth_fx.capture.unrewritten import UnrewrittenLayerWarning

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **SHAPE),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                     shared_expert_intermediate_size=64, decoder_sparse_step=1, **SHAPE),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                                     decoder_sparse_step=1, **SHAPE),
    "olmoe": lambda: transformers.OlmoeConfig(num_experts=4, num_experts_per_tok=2, **SHAPE),
    "gpt_oss": lambda: transformers.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                                 layer_types=["full_attention", "sliding_attention"], **SHAPE),
}
MODES = {"plain": (False, False), "lora": (True, False), "checkpointing": (False, True), "both": (True, True)}


def moe_model(family: str, lora: bool, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    attention = "eager" if family == "gpt_oss" else "sdpa"  # GPT-OSS has no sdpa path in transformers
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation=attention)
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, config)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give it values so every gradient is exercised
                torch.nn.init.normal_(p, std=0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def layer_captures(model: torch.nn.Module) -> int:
    report = sloth_fx.report(model)
    return sum(len(region.captures) for name, region in report.regions.items() if name.endswith("DecoderLayer"))


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layers_are_captured_once_rewritten_and_exact(family, mode):
    original = moe_model(family, *MODES[mode])
    optimized = sloth_fx.optimize(twin(original))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnrewrittenLayerWarning)
        assert_same_training_step(original, optimized, batch())
        loss_and_grads(optimized, batch(s=13, seed=2))  # another length, other routing: one dynamic capture
        settled = layer_captures(optimized)
        for seed in (3, 4, 5):  # other routings, lengths seen: no capture more
            assert_same_training_step(original, optimized, batch(s=13, seed=seed))
    assert layer_captures(optimized) == settled
    text = sloth_fx.explain(optimized)
    assert "routed experts mlp.experts run outside the capture, as transformers runs them" in text
    assert "sloth_fx has no fused MoE op yet" in text
    assert "rmsnorm: rewrote input_layernorm" in text
    if MODES[mode][0]:
        assert "lora: rewrote self_attn.q_proj" in text


@pytest.mark.usefixtures("reference_ops")
def test_experts_are_found_through_peft_wrappers_copied_and_put_back_by_uninstall():
    model = moe_model("mixtral", lora=True, checkpointing=False)
    layer = model.get_base_model().model.layers[0]
    (path, experts), = routed_experts(layer)
    assert path == "mlp.experts" and experts is layer.mlp.experts and hasattr(experts, "base_layer")  # PEFT's wrapper
    assert list(routed_experts(layer.self_attn)) == []  # no stacked weights: no experts
    original = twin(model)
    sloth_fx.optimize(model)
    assert isinstance(experts.__dict__["forward"], EagerExperts) and experts.forward.module is experts
    copied = twin(model)  # a copy's experts run its own weights
    copied_experts = copied.get_base_model().model.layers[0].mlp.experts
    assert copied_experts.forward.module is copied_experts
    assert_same_training_step(original, copied, batch())
    uninstall(model._sloth_fx)
    assert "forward" not in experts.__dict__  # as PEFT left it
