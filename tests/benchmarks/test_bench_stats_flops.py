"""Statistics and FLOP counting of the benchmark harness."""

import math

import pytest
import torch

from benchmarks import flops, stats
from benchmarks.configs import CONFIGS, LLAMA2_7B, ModelShape, get_config

# A shape small enough to count by hand: H=8, one layer, I=12, 2 heads of 4, 1 KV head, V=10.
HAND = ModelShape("hand", "llama", hidden=8, layers=1, intermediate=12, heads=2, kv_heads=1, vocab=10)


def test_median_odd_even_and_empty():
    assert stats.median([3.0, 1.0, 2.0]) == 2.0
    assert stats.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        stats.median([])


def test_tokens_per_second_uses_median_after_warmup():
    # warm-up steps are slow and must not count; median of [1, 2, 100] is 2.
    times = [50.0, 40.0, 30.0, 1.0, 2.0, 100.0]
    assert stats.tokens_per_second(1000, times, warmup=3) == pytest.approx(500.0)
    with pytest.raises(ValueError):
        stats.tokens_per_second(1000, times[:3], warmup=3)


def test_max_relative_difference():
    ref = [10.0, 8.0, 5.0]
    assert stats.max_relative_difference(ref, ref) == 0.0
    assert stats.max_relative_difference([10.0, 8.8, 5.1], ref) == pytest.approx(0.1)
    # only shared steps count
    assert stats.max_relative_difference([10.0], ref) == 0.0
    assert stats.max_relative_difference([], ref) is None
    assert stats.max_relative_difference([10.0, float("nan")], ref) == math.inf


def test_mfu():
    assert stats.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        stats.mfu(1e12, 0.0, 1e12)


def test_param_count_by_hand():
    # q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; mlp 3*8*12 = 288; two norms 16 -> 496 per layer
    assert flops.layer_params(HAND) == 496
    # + final norm 8 + lm_head 10*8 = 584 (input embedding excluded)
    assert flops.non_embedding_params(HAND) == 584


def test_param_count_matches_the_real_model():
    """N counted from the shape equals the HF model's parameters minus its input embedding."""
    from benchmarks.models import build_base_model

    model = build_base_model(HAND, "cpu", seed=0, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    assert total - emb == flops.non_embedding_params(HAND)


def test_step_flops_by_hand():
    # attention forward, one sequence of 3: causal QK^T has 3*4/2 = 6 dot products of length 4
    # per head (48 FLOPs), P V the same: 96 per head, 2 heads -> 192.
    assert flops.attention_flops_forward(HAND, [3]) == 192
    f = flops.step_flops(HAND, [3], checkpointing=False)
    assert f == {"forward": 3504, "input_grad": 3504, "recompute": 0, "attention": 576, "total": 7584}
    f = flops.step_flops(HAND, [3], checkpointing=True)
    # recompute: the layers only (496 params), 2*496*3 = 2976; attention 192*4 = 768
    assert f["recompute"] == 2976 and f["attention"] == 768 and f["total"] == 3504 * 2 + 2976 + 768


def test_llama2_7b_param_count():
    # Llama-2-7B has 6.74e9 parameters; minus the 32000x4096 input embedding.
    assert flops.non_embedding_params(LLAMA2_7B) == 6_738_415_616 - 32000 * 4096


def test_configs_table():
    assert [CONFIGS[k].batch * CONFIGS[k].seq for k in ("E1", "E2", "E3", "E4", "E5")] == [16384, 4096, 16384, 16384, 16384]
    assert CONFIGS["E3"].precision == "nf4" and CONFIGS["E2"].checkpointing is False
    assert CONFIGS["E4"].shape.kv_heads == 8 and CONFIGS["E5"].shape.vocab == 128256
    c = get_config("E2", layers=2)
    assert c.id == "E2[layers=2]" and c.shape.layers == 2 and c.shape.hidden == 4096
    with pytest.raises(ValueError, match="unknown configuration"):
        get_config("E9")


def test_nf4_qlora_model_on_cpu():
    """QLoRA build: every decoder-layer Linear becomes a bnb Linear4bit (nf4) under a PEFT LoRA
    layer, the head stays a plain Linear, and only the adapters train."""
    bnb = pytest.importorskip("bitsandbytes")
    from benchmarks.models import decoder_layers, make_optimizer
    from benchmarks.systems import prepare

    cfg = get_config("tiny").replace(precision="nf4")
    p = prepare("hf", cfg, "cpu", seed=0)
    q = decoder_layers(p.model)[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and q.base_layer.weight.quant_type == "nf4"
    assert hasattr(q, "lora_A") and type(p.model.get_base_model().lm_head) is torch.nn.Linear
    trainable = {n for n, t in p.model.named_parameters() if t.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(len(g["params"]) for g in make_optimizer(p.model).param_groups) == len(trainable)
