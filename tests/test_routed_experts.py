"""MoE models' routed experts run the fused op outside the capture: every layer is captured once
and rewritten, trains as transformers and PEFT train it, and explain names the experts' rewrite,
or, for GPT-OSS, why its experts are refused (with the warning).

Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE, OLMoE and GPT-OSS (router and expert
biases), tiny and random; each plain, with LoRA on attention and on the experts (PEFT's
``target_parameters``), with activation checkpointing, and with both. Before, every step routed
otherwise captured the layers again (a tiny Mixtral: 35 captures in six steps, then Dynamo's
recompile limit). Ragged routing (an expert with no token, one with all of them) is driven through
the experts module itself.
"""

import re
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from tiny_models import assert_same_training_step, batch, loss_and_grads, twin

import sloth_fx
from sloth_fx.capture.install import uninstall
from sloth_fx.capture.routed_experts import FusedExperts, UnfusedExpertsWarning, routed_experts
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


def moe_model(family: str, lora: bool, checkpointing: bool, layers: int = 2) -> torch.nn.Module:
    """A tiny ``family`` model of ``layers`` decoder layers (GPT-OSS: 2, its layer types), LoRA on
    attention and the experts' stacks (PEFT's target_parameters) with non-zero B where ``lora``."""
    torch.manual_seed(0)
    attention = "eager" if family == "gpt_oss" else "sdpa"  # GPT-OSS has no sdpa path in transformers
    config = FAMILIES[family]()
    config.num_hidden_layers = layers
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_training_step(original, optimized, batch())
        loss_and_grads(optimized, batch(s=13, seed=2))  # another length, other routing: one dynamic capture
        settled = layer_captures(optimized)
        for seed in (3, 4, 5):  # other routings, lengths seen: no capture more
            assert_same_training_step(original, optimized, batch(s=13, seed=seed))
    assert layer_captures(optimized) == settled
    unrewritten = [str(w.message) for w in caught if issubclass(w.category, UnrewrittenLayerWarning)]
    text = sloth_fx.explain(optimized)
    if family == "gpt_oss":  # expert biases, interleaved gate and up, a clamped gate: refused by name, warned once
        assert len(unrewritten) == 1 and "GptOssExperts: has_bias=True" in unrewritten[0], unrewritten
        assert [w.category for w in caught if issubclass(w.category, UnrewrittenLayerWarning)] == [UnfusedExpertsWarning]
        assert re.search(r"routed experts mlp\.experts: as transformers runs them in \d+ forward calls: GptOssExperts: "
                         "has_bias=True", text), text
    else:
        assert unrewritten == []
        lora = "LoRA folded in (gate_up r=4, down r=4)" if MODES[mode][0] else "no LoRA on the experts"
        assert re.search(rf"routed experts mlp\.experts: fused op in \d+ forward calls \(4 experts, silu, {re.escape(lora)}", text), text
    assert "rmsnorm: rewrote input_layernorm" in text
    if MODES[mode][0]:
        assert "lora: rewrote self_attn.q_proj" in text


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("routing", ["one expert takes every token", "top-1, two experts idle"])
def test_ragged_routing_through_the_fused_experts_matches_the_module(routing):
    """An expert that receives no token and one that receives every token, driven through the
    experts module of an optimized Mixtral with LoRA: output and every gradient (hidden states,
    routing weights: the router's gradient, both projections' adapters) as PEFT's module gives."""
    original = moe_model("mixtral", lora=True, checkpointing=False)
    optimized = sloth_fx.optimize(twin(original))
    tokens, hidden = 9, original.config.hidden_size
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=generator)
    if routing == "one expert takes every token":  # expert 2 in every row, expert 3 never
        index = torch.stack([torch.full((tokens,), 2), torch.arange(tokens) % 2], dim=1)
    else:
        index = (torch.arange(tokens) % 2).unsqueeze(1)  # experts 2 and 3 idle
    weights = torch.rand(tokens, index.shape[1], generator=generator)
    results = []
    for model in (original, optimized):
        experts = model.get_base_model().model.layers[1].mlp.experts
        inputs = (x.clone().requires_grad_(), index, weights.clone().requires_grad_())
        out = experts(*inputs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        adapters = {n: p.grad for n, p in experts.named_parameters() if p.requires_grad}
        results.append((out, inputs[0].grad, inputs[2].grad, adapters))
    assert len(results[0][3]) == 4  # lora_A and lora_B of gate_up_proj and of down_proj
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
    assert "fused op in 1 forward call (" in sloth_fx.explain(optimized)


@pytest.mark.usefixtures("reference_ops")
def test_experts_are_found_through_peft_wrappers_copied_and_put_back_by_uninstall():
    model = moe_model("mixtral", lora=True, checkpointing=False)
    layer = model.get_base_model().model.layers[0]
    (path, experts), = routed_experts(layer)
    assert path == "mlp.experts" and experts is layer.mlp.experts and hasattr(experts, "base_layer")  # PEFT's wrapper
    assert list(routed_experts(layer.self_attn)) == []  # no stacked weights: no experts
    original = twin(model)
    sloth_fx.optimize(model)
    assert isinstance(experts.__dict__["forward"], FusedExperts) and experts.forward.module is experts
    copied = twin(model)  # a copy's experts run its own weights
    copied_experts = copied.get_base_model().model.layers[0].mlp.experts
    assert copied_experts.forward.module is copied_experts
    assert_same_training_step(original, copied, batch())
    uninstall(model._sloth_fx)
    assert "forward" not in experts.__dict__  # as PEFT left it


@pytest.mark.usefixtures("reference_ops")
def test_explain_counts_the_forward_calls_whether_or_not_the_recompute_runs_the_op_to_its_end():
    """A checkpointed layer runs its experts again in backward; torch's early stop usually ends
    that run inside the op, and without it the op completes. explain counts forward calls either
    way: two steps of two layers are 4."""
    for early_stop in (True, False):
        optimized = sloth_fx.optimize(moe_model("mixtral", lora=True, checkpointing=True))
        with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
            for _ in range(2):
                loss_and_grads(optimized, batch())
        text = str(sloth_fx.explain(optimized))
        assert re.search(r"routed experts mlp\.experts: fused op in 4 forward calls \(", text), (early_stop, text)


@pytest.mark.usefixtures("reference_ops")
def test_experts_that_compute_otherwise_run_unfused_with_a_warning_and_adapters_can_be_switched_off():
    """The check reads the module's numbers, not only its flags: experts whose forward doubles the
    output are refused on the first call's tokens, warned of, and stay exact. PEFT's
    disable_adapter runs the fused op without LoRA."""
    original = moe_model("mixtral", lora=False, checkpointing=False)
    experts_class = type(original.model.layers[0].mlp.experts)

    class Doubled(experts_class):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    for layer in original.model.layers:
        layer.mlp.experts.__class__ = Doubled
    optimized = sloth_fx.optimize(twin(original))
    with pytest.warns(UnfusedExpertsWarning, match="off by .* from the module's forward"):
        assert_same_training_step(original, optimized, batch())

    adapted = moe_model("mixtral", lora=True, checkpointing=False)
    optimized = sloth_fx.optimize(twin(adapted))
    with adapted.disable_adapter(), optimized.disable_adapter():  # nothing trains: the losses only
        loss_ref, loss = (model(**batch()).loss for model in (adapted, optimized))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert re.search(r"fused op in \d+ forward calls \(4 experts, silu, no LoRA on the experts", sloth_fx.explain(optimized))
