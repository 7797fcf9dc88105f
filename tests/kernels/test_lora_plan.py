"""LoRA plans as functions of shape: where each form wins, what is reported, what is cached."""

import math

import pytest
import torch

from sloth_fx.kernels.lora_forms import group_plans
from sloth_fx.kernels.lora_plan import LoRAPlan, lora_plan
from sloth_fx.kernels.roofline import DeviceRates


def _crossover(form, in_features, out_features, elem_bytes=4, **kw):
    """Smallest T at which the plan picks merged for ``form`` (bisection; merged must win at 2^20)."""
    lo, hi = 1, 2**20
    assert getattr(lora_plan(lo, in_features, out_features, 16, elem_bytes, **kw), form) == "factored"
    assert getattr(lora_plan(hi, in_features, out_features, 16, elem_bytes, **kw), form) == "merged"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if getattr(lora_plan(mid, in_features, out_features, 16, elem_bytes, **kw), form) == "merged":
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("in_features,out_features", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_lora_plan_flips_from_factored_to_merged_as_tokens_grow(in_features, out_features):
    # memory-bound on both sides: factored moves ~2·T·out (forward) / 2·T·in (dX) elements more,
    # merged ~2·out·in: the forward flips at T ≈ in, dX at T ≈ out
    t_fwd = _crossover("forward", in_features, out_features)
    t_dx = _crossover("backward_dx", in_features, out_features)
    assert t_fwd == pytest.approx(in_features, rel=0.02)
    assert t_dx == pytest.approx(out_features, rel=0.02)
    below, above = lora_plan(t_fwd - 1, in_features, out_features, 16, 4), lora_plan(t_fwd, in_features, out_features, 16, 4)
    assert below.forward == "factored" and above.forward == "merged"
    assert below.predicted["forward factored"] <= below.predicted["forward merged"]
    assert above.predicted["forward merged"] < above.predicted["forward factored"]


def test_lora_plan_does_not_merge_in_16_bit_unless_allowed():
    plan = lora_plan(65536, 4096, 4096, 16, 2)
    assert "merged" not in (plan.forward, plan.backward_dx) and "16 bits" in plan.reason
    # the predicted times are still a function of the shapes: merged would be cheaper here
    assert plan.predicted["forward merged"] < plan.predicted["forward factored"]
    assert _crossover("forward", 4096, 4096, 2, allow_16bit_merge=True) == pytest.approx(4096, rel=0.02)


def test_lora_plan_never_merges_mixed_dtypes():
    plan = lora_plan(65536, 4096, 4096, 16, 2, adapter_elem_bytes=4, allow_16bit_merge=True)
    assert plan.forward == "factored" and plan.backward_dx == "factored" and "rounded once to the base dtype" in plan.reason
    assert "not stacked" in plan.reason


def test_lora_plan_reports_every_alternative_and_a_saving_against_peft():
    plan = lora_plan(16384, 4096, 11008, 16, 2)
    assert set(plan.predicted) == {f"{p} {f}" for p in ("forward", "dX")
                                   for f in ("peft", "factored", "merged", "stacked", "stacked-kept")}
    assert all(v > 0 and math.isfinite(v) for v in plan.predicted.values())
    # the fused factored form drops PEFT's separate passes over [T, out] and [T, in]
    assert plan.predicted["forward factored"] < plan.predicted["forward peft"]
    assert plan.predicted["dX factored"] < plan.predicted["dX peft"]
    expected = (plan.predicted["forward peft"] + plan.predicted["dX peft"]
                - plan.predicted["forward factored"] - plan.predicted["dX factored"])
    assert plan.saving() == plan.saving_vs_peft == pytest.approx(expected) and plan.saving() > 0


def test_inference_plan_skips_the_adapter_product_when_merged():
    train = lora_plan(64, 4096, 4096, 16, 4)
    infer = lora_plan(64, 4096, 4096, 16, 4, training=False)
    assert infer.predicted["forward merged"] < train.predicted["forward merged"]
    assert "dX factored" not in infer.predicted
    assert infer.predicted["forward factored"] == train.predicted["forward factored"]


def test_lora_plan_is_cached_per_shape_and_rates():
    lora_plan.cache_clear()
    first = lora_plan(4096, 4096, 11008, 16)
    again = lora_plan(4096, 4096, 11008, 16)
    assert again is first and lora_plan.cache_info().hits == 1
    lora_plan(4096, 4096, 11008, 16, 2, DeviceRates(flops=1e14, bandwidth=1e12))
    lora_plan(4097, 4096, 11008, 16)
    assert lora_plan.cache_info().misses == 3


def test_plan_errors():
    with pytest.raises(ValueError, match="tokens"):
        lora_plan(0, 4096, 4096, 16)
    with pytest.raises(ValueError, match="forward"):
        LoRAPlan("fused", "factored")
    with pytest.raises(ValueError, match="siblings"):
        lora_plan(16, 4096, 4096, 16, siblings=0)


def test_fp32_adapters_cost_the_fused_op_no_more_than_16_bit_ones():
    """lowrank_mm reads the 16-bit operands as they are: PEFT pays for the fp32 copies, we do not."""
    same = lora_plan(16384, 4096, 11008, 16, 2)
    mixed = lora_plan(16384, 4096, 11008, 16, 2, adapter_elem_bytes=4)
    for form in ("forward factored", "dX factored"):
        assert mixed.predicted[form] == pytest.approx(same.predicted[form], rel=0.01)
    for form in ("forward peft", "dX peft"):
        assert mixed.predicted[form] > same.predicted[form]
    assert mixed.saving() > same.saving()


# ---- the stacked form ------------------------------------------------------------------------


def _first_t(pick, step=256, **kw):
    """Smallest T (a multiple of ``step``, up to 2^20) at which ``pick(plan)`` holds, else None."""
    return next((t for t in range(step, 2**20 + 1, step) if pick(lora_plan(t, **kw))), None)


@pytest.mark.parametrize("in_features,out_features", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_stacked_dx_wins_from_about_four_times_in_tokens(in_features, out_features):
    """dX: stacking saves a read of dY (T·out) for a copy of W (2·out·in) and a tile column of
    the GEMM (2·T·out·128 FLOPs, at about half the rate the read costs): T ≈ 4.4·in."""
    t = _first_t(lambda p: p.backward_dx == "stacked", in_features=in_features, out_features=out_features, rank=16)
    assert t == pytest.approx(4.4 * in_features, rel=0.05)
    below = lora_plan(t - 256, in_features, out_features, 16)
    assert below.backward_dx == "factored" and below.predicted["dX factored"] <= below.predicted["dX stacked"]


def test_llama_forward_is_never_stacked():
    """The forward saves a read of x (T·in) for a copy of y (2·T·out): never for in <= 2·out, and
    down_proj's gain (in = 2.7·out) goes to the tile column, over a 4-bit base too."""
    for in_f, out_f, n in [(4096, 4096, 3), (4096, 4096, 1), (4096, 11008, 2), (11008, 4096, 1)]:
        for base_4bit in (False, True):
            for t in (2200, 16384, 2**20):
                plan = lora_plan(t, in_f, out_f, 16, siblings=n, base_4bit=base_4bit)
                assert plan.forward == "factored", (in_f, out_f, t, base_4bit)
                assert plan.predicted["forward stacked"] > plan.predicted["forward factored"]


def test_stacked_forward_wins_where_in_is_far_above_two_out():
    """in = 8192, out + r = 128 (no tile column): a 4-bit base, dequantized into the stack
    anyway, stacks from few tokens; a dense base, whose W is copied, from more."""
    t_4bit, t_dense = (_first_t(lambda p: p.forward == "stacked", 16, in_features=8192, out_features=112, rank=16,
                                base_4bit=q) for q in (True, False))
    assert t_4bit <= 32 and 4 * t_4bit <= t_dense <= 512
    dense, quantized = (lora_plan(4096, 8192, 112, 16, base_4bit=q) for q in (False, True))
    assert quantized.predicted["forward stacked"] < dense.predicted["forward stacked"]
    assert dense.predicted["forward stacked-kept"] < dense.predicted["forward stacked"]
    assert "forward stacked-kept" not in quantized.predicted  # a kept copy of a 4-bit W undoes the quantization
    # dX's [W | B] copies W over either base: bitsandbytes writes only a contiguous buffer
    assert quantized.predicted["dX stacked"] == dense.predicted["dX stacked"]
    assert not lora_plan(4096, 8192, 112, 16, stack_forward=False).forward == "stacked"


def test_stacked_needs_adapters_in_the_compute_dtype_unless_allowed():
    same = lora_plan(65536, 4096, 4096, 16, 2)
    mixed = lora_plan(65536, 4096, 4096, 16, 2, adapter_elem_bytes=4)
    allowed = lora_plan(65536, 4096, 4096, 16, 2, adapter_elem_bytes=4, allow_rounded_adapters=True)
    assert same.backward_dx == "stacked" and allowed.backward_dx == "stacked" and mixed.backward_dx == "factored"
    assert mixed.predicted["dX stacked"] < mixed.predicted["dX factored"]  # reported either way
    assert "not stacked" in mixed.reason and "not stacked" not in allowed.reason


def test_siblings_share_the_read_of_x():
    """Three siblings read x once for their x·Aᵀ: each factored forward is charged a third of it;
    stacked, which reads x in its own GEMM, saves only that third."""
    alone, shared = (lora_plan(16384, 4096, 4096, 16, siblings=n) for n in (1, 3))
    read_x = 16384 * 4096 * 2 / DeviceRates().bandwidth
    assert alone.predicted["forward factored"] - shared.predicted["forward factored"] == pytest.approx(read_x * 2 / 3)
    assert alone.predicted["forward stacked"] == shared.predicted["forward stacked"]


def _shape(outs, ranks=None, quantized=None):
    ranks = ranks or (16,) * len(outs)
    return 8192, tuple(outs), tuple(ranks), torch.bfloat16, torch.bfloat16, quantized or (True,) * len(outs), True


def test_a_group_stacks_every_forward_or_none():
    """Alone, 8192->112 stacks its forward and 8192->4096 does not; together neither does (the
    read of x they share would still be made)."""
    cpu = torch.device("cpu")
    assert [p.forward for p in group_plans(4096, _shape([112, 112]), cpu)] == ["stacked", "stacked"]
    assert [p.forward for p in group_plans(4096, _shape([4096]), cpu)] == ["factored"]
    assert [p.forward for p in group_plans(4096, _shape([112, 4096]), cpu)] == ["factored", "factored"]
    # dX is each sibling's own: its choice stands
    mixed = group_plans(65536, _shape([112, 4096]), cpu)
    assert [p.backward_dx for p in mixed] == [lora_plan(65536, 8192, o, 16, siblings=2, base_4bit=True).backward_dx
                                              for o in (112, 4096)]
