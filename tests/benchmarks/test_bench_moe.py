"""The MoE configurations M1, M1p (Qwen3-30B-A3B shape) and M2, M2p (Mixtral-8x7B shape): their
transformers configs, LoRA on the routed experts, MoE FLOP counting, and a CPU run through the harness."""

import json
import sys
import types

import pytest
import torch

from benchmarks import flops, report, runner
from benchmarks.configs import CONFIGS, LORA_EXPERT_PARAMETERS, MoEShape, get_config, lora_targets
from benchmarks.models import build_base_model, decoder_layers, hf_config
from benchmarks.systems import LIGER_APPLY, Unsupported, experts_quantized, prepare

# Small enough to count by hand: H=8, one layer, 2 heads of 4, 1 KV head, V=10; 4 experts of 6, top-2.
HAND_MIXTRAL = MoEShape("hand-mixtral", "mixtral", 8, 1, 6, 2, 1, 10, experts=4, experts_per_token=2, moe_intermediate=6)
# Qwen3-MoE: heads of 8 on a hidden size of 8 (wider than hidden // heads), per-head q/k norms.
HAND_QWEN = MoEShape("hand-qwen3-moe", "qwen3_moe", 8, 1, 12, 2, 1, 10, attn_head_dim=8, experts=4,
                     experts_per_token=2, moe_intermediate=6)


def test_m1_is_qwen3_30b_a3b_at_half_depth():
    for name, data, batch in (("M1", "random", 4), ("M1p", "packed", 48)):
        c = CONFIGS[name]
        assert (c.precision, c.checkpointing, c.data, c.batch, c.seq) == ("bf16", True, data, batch, 4096)
        hc = hf_config(c.shape)
        assert type(hc).__name__ == "Qwen3MoeConfig"
        assert (hc.num_experts, hc.num_experts_per_tok, hc.moe_intermediate_size) == (128, 8, 768)
        assert (hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads) == (2048, 24, 32, 4)
        assert (hc.head_dim, hc.vocab_size, hc.rope_parameters["rope_theta"]) == (128, 151936, 1e6)
        assert hc.norm_topk_prob is True and hc.decoder_sparse_step == 1 and hc.mlp_only_layers == []
        assert hc.output_router_logits is False  # the loss is the LM loss alone
        assert c.shape.full_layers == 48 and "24 of 48 layers" in c.describe() and "attn+experts" in c.describe()
        assert "24 of its 48 layers" in c.note and "80 GB" in c.note
    assert CONFIGS["M1"].tokens_per_step == 16384
    # the full model is Qwen3-30B-A3B's 30.5B parameters, 3.3B of them active a token
    shape48 = get_config("M1", layers=48).shape
    emb = shape48.vocab * shape48.hidden
    assert round((flops.non_embedding_params(shape48) + emb) / 1e9, 1) == 30.5
    assert round((flops.active_non_embedding_params(shape48) + emb) / 1e9, 1) == 3.4


def test_m2_is_mixtral_8x7b_nf4_at_half_depth():
    for name, data in (("M2", "random"), ("M2p", "packed")):
        c = CONFIGS[name]
        assert (c.precision, c.checkpointing, c.data) == ("nf4", True, data)
        hc = hf_config(c.shape)
        assert type(hc).__name__ == "MixtralConfig"
        assert (hc.num_local_experts, hc.num_experts_per_tok, hc.intermediate_size) == (8, 2, 14336)
        assert (hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads) == (4096, 16, 32, 8)
        assert (hc.vocab_size, hc.rope_parameters["rope_theta"], hc.sliding_window) == (32000, 1e6, None)
        assert "16 of 32 layers" in c.describe() and "attn nf4, experts bf16" in c.describe()
        assert "only nn.Linear is quantised" in c.note and "stay bf16" in c.note
    shape32 = get_config("M2", layers=32).shape
    emb = shape32.vocab * shape32.hidden
    assert round((flops.non_embedding_params(shape32) + emb) / 1e9, 1) == 46.7  # Mixtral-8x7B's 46.7B
    assert round((flops.active_non_embedding_params(shape32) + emb) / 1e9, 1) == 12.9  # 12.9B active


def test_moe_shape_is_checked_and_cli_lists_the_configs(capsys):
    with pytest.raises(ValueError, match="family"):
        MoEShape("x", "llama", 8, 1, 6, 2, 1, 10, experts=4, experts_per_token=2, moe_intermediate=6)
    with pytest.raises(ValueError, match="experts_per_token"):
        MoEShape("x", "mixtral", 8, 1, 6, 2, 1, 10, experts=4, experts_per_token=5, moe_intermediate=6)
    assert get_config("M2", layers=2).shape.layers == 2 and get_config("M2", layers=2).shape.experts == 8
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["e2e", "--help"])
    assert "M1,M1p,M2,M2p" in capsys.readouterr().out.replace("\n", "").replace(" ", "")


def test_lora_targets_attention_and_the_expert_parameters():
    assert lora_targets(CONFIGS["M1"].shape) == (("q_proj", "k_proj", "v_proj", "o_proj"), LORA_EXPERT_PARAMETERS)
    assert lora_targets(CONFIGS["M2"].shape) == lora_targets(CONFIGS["M1"].shape)
    assert lora_targets(CONFIGS["E1"].shape)[1] == ()
    assert LORA_EXPERT_PARAMETERS == ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.mark.parametrize("name", ["tinymoe", "tinymixtral"])
def test_hf_model_has_lora_on_every_expert_and_a_frozen_router(name):
    from peft.tuners.lora.layer import ParamWrapper

    cfg = get_config(name)
    p = prepare("hf", cfg, "cpu", seed=0)
    layer = decoder_layers(p.model)[0]
    outer = layer.mlp.experts
    assert isinstance(outer, ParamWrapper) and isinstance(outer.base_layer, ParamWrapper)
    assert {outer.parameter_name, outer.base_layer.parameter_name} == {"gate_up_proj", "down_proj"}
    assert outer.num_experts == cfg.shape.experts
    trainable = {n for n, t in p.model.named_parameters() if t.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp.experts.lora_A" in n for n in trainable) and any("self_attn.q_proj.lora_A" in n for n in trainable)
    assert not any("mlp.gate." in n for n in trainable)  # the router stays frozen
    assert layer.mlp.gate.weight.requires_grad is False
    assert p.notes["lora_target_parameters"] == sorted(LORA_EXPERT_PARAMETERS)
    assert p.notes["experts_implementation"] in ("eager", "grouped_mm", "batched_mm")


def test_nf4_mixtral_quantises_attention_only():
    """As bitsandbytes through transformers: nn.Linear becomes 4-bit, the 3-D experts and the router
    stay bf16, and LoRA goes on both."""
    bnb = pytest.importorskip("bitsandbytes")

    p = prepare("hf", get_config("tinymixtral").replace(precision="nf4"), "cpu", seed=0)
    layer = decoder_layers(p.model)[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    experts = layer.mlp.experts.get_base_layer()
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.dim() == 3
    assert experts.down_proj.dtype == torch.bfloat16 and layer.mlp.gate.weight.dtype == torch.bfloat16
    assert hasattr(layer.mlp.experts, "lora_A")


def test_m2q_quantizes_the_experts_after_lora_for_hf_and_sloth_fx_and_unsloth_runs_only_it():
    """M2q is M2 with the experts' stacks nf4 (sloth_fx.quantize_experts after get_peft_model);
    both hf and sloth_fx train that model, one step each on the tiny Mixtral, and lose the same.
    Unsloth's load_in_4bit quantizes the experts itself: it refuses M2 (bf16 experts) before it
    loads anything, and the stacks' bytes tell a quantized model from a dense one."""
    bnb = pytest.importorskip("bitsandbytes")

    for name, data in (("M2q", "random"), ("M2qp", "packed")):
        c = CONFIGS[name]
        assert (c.precision, c.experts, c.data, c.shape) == ("nf4", "nf4", data, CONFIGS["M2"].shape)
        assert "attn nf4, experts nf4" in c.describe() and "quantize_experts" in c.note
    with pytest.raises(ValueError, match="experts"):
        CONFIGS["E3"].replace(experts="nf4")
    cfg = get_config("tinymixtral").replace(precision="nf4", experts="nf4", batch=1, seq=16)
    losses = []
    for system in ("hf", "sloth_fx"):
        p = prepare(system, cfg, "cpu", seed=0)
        experts = decoder_layers(p.model)[0].mlp.experts.get_base_layer()
        assert isinstance(experts.gate_up_proj, bnb.nn.Params4bit) and experts.gate_up_proj.quant_state.quant_type == "nf4"
        ids = torch.randint(3, cfg.shape.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        losses.append(p.model(input_ids=ids, labels=ids).loss.item())
        assert experts_quantized(p.model, cfg.shape)
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    dense = prepare("hf", cfg.replace(experts="bf16"), "cpu", seed=0)
    assert not experts_quantized(dense.model, cfg.shape)
    with pytest.raises(Unsupported, match="M2q, M2qp"):
        prepare("unsloth", cfg.replace(experts="bf16"), "cpu", seed=0)


@pytest.mark.parametrize("shape", [HAND_MIXTRAL, HAND_QWEN], ids=["mixtral", "qwen3_moe"])
def test_moe_stored_param_count_matches_the_real_model(shape):
    model = build_base_model(shape, "cpu", seed=0, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    assert total - model.get_input_embeddings().weight.numel() == flops.non_embedding_params(shape)


def test_moe_step_flops_by_hand():
    # Mixtral-style: attention q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; router 4*8 = 32; 2 of 4 experts
    # a token, each 3*8*6 = 144 -> 288; two norms 16. Active per layer 192+32+288+16 = 528;
    # stored 192+32+4*144+16 = 816.
    assert flops.layer_active_params(HAND_MIXTRAL) == 528 and flops.layer_params(HAND_MIXTRAL) == 816
    # N = 528 + final norm 8 + lm_head 80 = 616
    assert flops.active_non_embedding_params(HAND_MIXTRAL) == 616
    f = flops.step_flops(HAND_MIXTRAL, [3], checkpointing=True)
    # attention forward: causal 3*4/2 = 6 dot products of 4 per head for QK^T and as many for PV:
    # 96 per head, 2 heads, one layer -> 192; x4 with backward and recompute.
    assert f == {"forward": 2 * 616 * 3, "input_grad": 2 * 616 * 3, "recompute": 2 * 528 * 3,
                 "attention": 192 * 4, "total": 3696 * 2 + 3168 + 768}
    # Qwen3-MoE: heads of 8: q 8*16 + k 8*8 + v 8*8 + o 16*8 = 384, q/k norms 2*8; router 32; experts 288;
    # norms 16 -> 736 active. Attention forward over one sequence of 3: 2 * 2 heads * 8 * 3*4 = 384.
    assert flops.layer_active_params(HAND_QWEN) == 736
    assert flops.attention_flops_forward(HAND_QWEN, [3]) == 384
    # only the top-k experts count: with all 4 experts active the MLP's share would be twice as large
    dense_like = MoEShape("all", "mixtral", 8, 1, 6, 2, 1, 10, experts=4, experts_per_token=4, moe_intermediate=6)
    assert flops.layer_active_params(dense_like) - flops.layer_active_params(HAND_MIXTRAL) == 2 * 144


def test_liger_without_a_family_patch_is_unsupported(monkeypatch):
    assert {c.shape.family for c in CONFIGS.values()} <= set(LIGER_APPLY)
    fake = types.ModuleType("liger_kernel.transformers")  # a Liger without the MoE patches
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    with pytest.raises(Unsupported, match="apply_liger_kernel_to_qwen3_moe"):
        prepare("liger", get_config("tinymoe"), "cpu", seed=0)


def test_report_notes_the_depth_cut():
    rows = [{"system": "hf", "config": "M1[layers=2]", "status": "failed", "reason": "x"},
            {"system": "hf", "config": "E1", "status": "failed", "reason": "x"}]
    notes = report.config_notes(rows)
    assert notes.startswith("- **M1[layers=2]**: M1's note, this run with layers=2: Qwen3-30B-A3B at 24 of its 48 layers")
    assert "E1" not in notes
    assert report.config_notes([dict(rows[0], config="M2")]).startswith("- **M2**: Mixtral-8x7B at 16 of its 32 layers")


def test_tiny_moe_through_the_harness_on_cpu(tmp_path):
    """hf on the tiny Qwen3-MoE in the worker subprocess, as `python -m benchmarks e2e` runs it."""
    rows = runner.run_suite(["hf"], ["tinymoe"], tmp_path, timeout=120,
                            worker_opts={"device": "cpu", "steps": 3, "warmup": 1, "allow_few_steps": True})
    r = rows[0]
    assert r["status"] == "ok", r.get("reason")
    assert len(r["losses"]) == 3 and all(torch.isfinite(torch.tensor(r["losses"])))
    shape = CONFIGS["tinymoe"].shape
    assert r["flops_per_step"] == flops.step_flops(shape, [32, 32], checkpointing=False)["total"]
    assert r["notes"]["lora_target_parameters"] == sorted(LORA_EXPERT_PARAMETERS)
    assert json.loads((tmp_path / "e2e_tinymoe_hf.json").read_text())["status"] == "ok"
