"""LoRA plans as functions of shape: where each form wins, what is reported, what is cached."""

import math

import pytest

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
    assert plan.forward == "factored" and plan.backward_dx == "factored" and "16 bits" in plan.reason
    # the predicted times are still a function of the shapes: merged would be cheaper here
    assert plan.predicted["forward merged"] < plan.predicted["forward factored"]
    assert _crossover("forward", 4096, 4096, 2, allow_16bit_merge=True) == pytest.approx(4096, rel=0.02)


def test_lora_plan_never_merges_mixed_dtypes():
    plan = lora_plan(65536, 4096, 4096, 16, 2, adapter_elem_bytes=4, allow_16bit_merge=True)
    assert plan.forward == "factored" and plan.backward_dx == "factored" and "rounded once to the base dtype" in plan.reason


def test_lora_plan_reports_every_alternative_and_a_saving_against_peft():
    plan = lora_plan(16384, 4096, 11008, 16, 2)
    assert set(plan.predicted) == {f"{p} {f}" for p in ("forward", "dX") for f in ("peft", "factored", "merged")}
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


def test_fp32_adapters_cost_the_fused_op_no_more_than_16_bit_ones():
    """lowrank_mm reads the 16-bit operands as they are: PEFT pays for the fp32 copies, we do not."""
    same = lora_plan(16384, 4096, 11008, 16, 2)
    mixed = lora_plan(16384, 4096, 11008, 16, 2, adapter_elem_bytes=4)
    for form in ("forward factored", "dX factored"):
        assert mixed.predicted[form] == pytest.approx(same.predicted[form], rel=0.01)
    for form in ("forward peft", "dX peft"):
        assert mixed.predicted[form] > same.predicted[form]
    assert mixed.saving() > same.saving()
