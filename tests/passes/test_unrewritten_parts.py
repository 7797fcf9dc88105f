"""Parts of a model that used to run unrewritten in silence: each is now rewritten, or ``explain``
says why not, and training stays exact either way.

- interleaved rope (Cohere, GLM4's partial one, DeepSeek-V3's): no pattern matches, the rope pass
  names it; DeepSeek-V3 with ``rope_interleave=False`` (HF's rotate_half on part of the head) is
  rewritten, and then nothing is named;
- Falcon's LoRA linears (``x @ W.T``, a fused query_key_value): rewritten;
- ``lora_bias=True``: rewritten (the adapter's bias joins the op's bias), refused by name where
  the adapter's bias is in another dtype than the base;
- DoRA, and LoRA over GPT-2's Conv1D: named by the LoRA pass's census;
- LoRA on ``lm_head``: the head's LoRA linear is fused, the loss named by the cross-entropy pass;
- DeepSeek-V3's layers under LoRA with activation checkpointing: captured and rewritten.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import COMMON, batch, config, loss_and_grads, twin
from torch import nn
from transformers import AutoModelForCausalLM, CohereConfig, DeepseekV3Config, FalconConfig, Glm4Config, GPT2Config

import sloth_fx
from sloth_fx.passes.lora_census import DORA
from sloth_fx.passes.loss_census import LORA_HEAD

pytestmark = pytest.mark.usefixtures("reference_ops")

TOKENS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)  # the families' defaults lie outside vocab 101
DEEPSEEK = dict(**COMMON, **TOKENS, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                moe_intermediate_size=32, first_k_dense_replace=1)  # layer 0 a dense MLP, layer 1 a MoE
CONFIGS = {
    "cohere": lambda: CohereConfig(**COMMON, **TOKENS, num_key_value_heads=4),
    "glm4": lambda: Glm4Config(**COMMON, **TOKENS, num_key_value_heads=2, head_dim=16),  # rope on half the head
    "deepseek_v3": lambda: DeepseekV3Config(**DEEPSEEK),  # rope_interleave=True, its default
    "deepseek_v3_half_split": lambda: DeepseekV3Config(**DEEPSEEK, rope_interleave=False),
    "falcon": lambda: FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101),
    "falcon_new_arch": lambda: FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
                                            num_kv_heads=2, new_decoder_architecture=True),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, bos_token_id=0, eos_token_id=0,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": lambda: config("llama"),
    "phi": lambda: config("phi"),
}
# The built-in default passes, named: a pass registered by a test (tests/passes/test_lora_4bit_pass.py
# registers a deliberately wrong one) joins the default list for the rest of the process.
EVERY_PASS = ["lora", "rmsnorm", "rope", "gated_mlp", "cross_entropy", "chunked_mlp"]
ATTENTION = {"cohere": ["q_proj", "k_proj", "v_proj", "o_proj"], "glm4": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]}
ATTENTION["deepseek_v3_half_split"] = ATTENTION["deepseek_v3"]


def peft_model(family, targets, *, dtype=torch.float32, checkpointing=False, **lora):
    """A random-init ``family`` with PEFT LoRA (r=4) on ``targets``, every adapter tensor non-zero."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa").to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B (and its bias) at zero; give them values so every gradient is exercised
            nn.init.normal_(p, std=0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def optimized_step(original, passes=EVERY_PASS, rtol=1e-5, atol=1e-6):
    """Optimize a copy of ``original`` and check that one training step of it has the original's
    loss and gradients (every trainable parameter's; both steps draw the same dropout masks);
    the report and explain's text."""
    optimized = sloth_fx.optimize(twin(original), passes=passes)
    (loss_ref, grads_ref), (loss, grads) = (seeded_step(model) for model in (original, optimized))
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    return sloth_fx.report(optimized), sloth_fx.explain(optimized)


def seeded_step(model):
    torch.manual_seed(5)
    return loss_and_grads(model, batch())


def reasons(report, pass_name):
    return {(rf.location, rf.reason) for rf in report.refusals(pass_name)}


@pytest.mark.parametrize("family", ["cohere", "glm4", "deepseek_v3"])
def test_interleaved_rope_is_named(family):
    report, text = optimized_step(peft_model(family, ATTENTION[family]))
    assert report.count("rope") == 0
    ((where, reason),) = reasons(report, "rope")
    assert where == "self_attn"
    assert reason.startswith("interleaved rotary embedding of 2 tensors (features 2i and 2i+1 rotate as a pair)")
    assert f"rope: refused self_attn: {reason}" in text
    assert report.count("lora") == 2 * len(ATTENTION[family])  # the layer's other rewrites run beside it


@pytest.mark.parametrize("family", ["llama", "deepseek_v3_half_split"])
def test_a_rewritten_rope_leaves_nothing_to_name(family):
    """DeepSeek-V3 with rope_interleave=False rotates q's last 8 features and a one-head k by
    rotate_half: the pattern takes both, and the census finds nothing left."""
    report, _ = optimized_step(peft_model(family, ATTENTION.get(family, ["q_proj", "v_proj"])))
    assert report.count("rope") == 2 * 2
    assert not report.refusals("rope")


@pytest.mark.parametrize("family,grouped", [("falcon", 2), ("falcon_new_arch", 0)])
def test_falcon_lora_is_fused(family, grouped):
    """FalconLinear computes x @ W.T; query_key_value is one fused linear. In the parallel layout
    query_key_value and dense_h_to_4h read one layer norm: one grouped op. dense_4h_to_h's
    output is added into in place (mlp_output += attention_output): it is copied first."""
    report, text = optimized_step(peft_model(family, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]))
    assert report.count("lora") == 4 * 2 and not report.refusals("lora")
    assert text.count("x read once for 2 linears") == grouped
    assert "mlp.dense_4h_to_h  (256->64, r=4, output copied for the in-place iadd)" in text


@pytest.mark.parametrize("family,targets", [
    ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("phi", ["q_proj", "k_proj", "v_proj", "dense", "fc1"]),
])
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_lora_bias_is_fused(family, targets, lora_dropout):
    """Llama's bases have no bias (the op's bias is s*b_B), Phi's have one (b + s*b_B). Every pass
    runs: the chunked MLP outlines Llama's MLP with the bias's sum inside."""
    original = peft_model(family, targets, lora_bias=True, lora_dropout=lora_dropout)
    biases = [n for n, p in original.named_parameters() if p.requires_grad and n.endswith("lora_B.default.bias")]
    assert len(biases) == 2 * len(targets)  # trained, so their gradients are compared
    report, text = optimized_step(original)
    assert report.count("lora") == 2 * len(targets) and not report.refusals("lora")
    assert text.count("lora_bias added to the op's bias") == len(targets)  # one capture serves both layers
    assert report.count("chunked_mlp") == (2 if family == "llama" else 0)  # Phi's MLP is not gated


def test_lora_bias_in_another_dtype_than_the_base_is_refused():
    """PEFT keeps fp32 adapters on a half-precision base and adds b_B in fp32."""
    original = peft_model("llama", ["q_proj", "v_proj"], dtype=torch.float16, lora_bias=True)
    report, _ = optimized_step(original, passes=["lora"], rtol=2e-2, atol=2e-3)
    assert report.count("lora") == 0
    assert {reason for _, reason in reasons(report, "lora")} == {
        "peft_lora: the adapter's bias (lora_bias=True) is torch.float32 on a torch.float16 base: PEFT adds it in "
        "torch.float32, the fused op adds a bias in the base dtype"}


def test_lora_over_a_base_of_another_kind_is_named():
    """GPT-2's Conv1D keeps its weight as [in, out] and computes addmm(b, x, W): PEFT's LoRA over
    it (fan_in_fan_out) matches no pattern, and the census names the base's op."""
    report, _ = optimized_step(peft_model("gpt2", ["c_attn", "c_proj"], fan_in_fan_out=True))
    assert report.count("lora") == 0
    assert reasons(report, "lora") == {
        (layer, f"PEFT's LoRA sum is over a base made by addmm in {layer}.base_layer: the fused op takes a linear "
                "base (F.linear(x, W, b), or x @ W.T + b) reading the adapters' input")
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")}


def test_dora_is_named():
    original = peft_model("llama", ["q_proj", "v_proj", "down_proj"], use_dora=True)
    report, text = optimized_step(original)
    assert report.count("lora") == 0
    assert DORA in {reason for _, reason in reasons(report, "lora")}
    assert f"lora: refused lora_A/lora_B: {DORA}" in text
    assert report.count("rmsnorm") == 5  # the rest of the layer is rewritten around it


@pytest.mark.parametrize("passes,head_fused", [(EVERY_PASS, True), (["cross_entropy"], False)])
def test_lora_on_lm_head_names_the_loss(passes, head_fused):
    """With every pass the head's LoRA linear is fused and the loss named; with the loss pass
    alone PEFT's sum makes the logits, and the reason is the same."""
    original = peft_model("llama", ["q_proj", "v_proj", "lm_head"])
    report, text = optimized_step(original, passes=passes)
    assert report.count("cross_entropy") == 0
    assert reasons(report, "cross_entropy") == {("lm_head", LORA_HEAD)}
    assert ("lora: rewrote lm_head  (64->101, r=4)" in text) == head_fused


def test_the_loss_census_is_quiet_where_the_loss_is_fused():
    report, _ = optimized_step(peft_model("llama", ["q_proj", "v_proj"]))
    assert report.count("cross_entropy") == 1
    assert not report.refusals("cross_entropy") and not report.refusals("lora")


def test_deepseek_v3_layers_under_lora_and_checkpointing_are_rewritten():
    """sloth_fx owns each gated layer's checkpoint (sloth_fx/memory/layer_checkpoint.py): the
    layers are captured whole, under checkpointing as without."""
    original = peft_model("deepseek_v3", ATTENTION["deepseek_v3"], checkpointing=True)
    report, _ = optimized_step(original)
    assert report.count("lora") == 5 * 2 and not report.refusals("lora")
    assert report.count("rmsnorm") == 4 * 2 + 1  # input, q_a, kv_a, post-attention; the final norm
    assert "recompute" in report.checkpointing  # the step checkpointed its layers
