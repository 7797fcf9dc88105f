"""The cost model: dynamic programming against brute force, and LoRA plans as functions of shape."""

import math
import random

import pytest
import torch

from sloth_fx.cost_model import (
    DEFAULT_RATES,
    DeviceRates,
    LoRAPlan,
    best_bracketing,
    enumerate_bracketings,
    lora_plan,
    matmul_cost,
    measure_device_rates,
    stream_cost,
)


def test_single_product_cost():
    c = matmul_cost(8, 16, 32, elem_bytes=2)
    assert c.flops == 2 * 8 * 16 * 32 and c.bytes == (8 * 16 + 16 * 32 + 8 * 32) * 2
    assert c.seconds == max(c.flops / DEFAULT_RATES.flops, c.bytes / DEFAULT_RATES.bandwidth)
    # accumulating into C reads it too
    assert matmul_cost(8, 16, 32, 2, accumulate=True).bytes == c.bytes + 8 * 32 * 2


def test_roofline_picks_the_binding_resource():
    rates = DeviceRates(flops=1e12, bandwidth=1e9, flops_fp32=1e11)
    big = matmul_cost(1024, 1024, 1024, 2, rates)  # ~341 FLOP/B, under this device's balance of 1000
    assert big.seconds == pytest.approx(big.bytes / 1e9) and big.seconds > big.flops / 1e12
    compute_bound = matmul_cost(4096, 4096, 4096, 2, DeviceRates(flops=1e9, bandwidth=1e15))
    assert compute_bound.seconds == pytest.approx(2 * 4096**3 / 1e9)
    memory_bound = matmul_cost(1, 4096, 4096, 2, DeviceRates(flops=1e18, bandwidth=1e9))
    assert memory_bound.seconds == pytest.approx((4096 + 4096 * 4096 + 4096) * 2 / 1e9)
    # fp32 uses the fp32 rate
    assert matmul_cost(4096, 4096, 4096, 4, DeviceRates(flops=1e9, bandwidth=1e15, flops_fp32=1e8)).seconds == \
        pytest.approx(2 * 4096**3 / 1e8)
    assert stream_cost(3e9, rates).seconds == pytest.approx(3.0)


@pytest.mark.parametrize("seed", range(16))
def test_dynamic_programming_matches_brute_force(seed):
    rng = random.Random(seed)
    n = 2 + seed % 6  # chains of 2..7 matrices
    dims = [rng.choice([1, 3, 7, 16, 64, 100, 1000, 4096, 11008]) for _ in range(n + 1)]
    shapes = list(zip(dims, dims[1:]))
    elem = rng.choice([2, 4])
    best = best_bracketing(shapes, elem)
    everything = enumerate_bracketings(shapes, elem)
    catalan = math.comb(2 * (n - 1), n - 1) // n
    assert len(everything) == catalan and len({b.order for b in everything}) == catalan
    brute = min(everything, key=lambda b: b.cost.seconds)
    assert best.cost.seconds == pytest.approx(brute.cost.seconds, rel=1e-12)
    # the reported FLOPs/bytes are those of the chosen order, as brute force counts them
    same = next(b for b in everything if b.order == best.order)
    assert (best.cost.flops, best.cost.bytes) == pytest.approx((same.cost.flops, same.cost.bytes), rel=1e-12)
    assert best.order.count("·") == n - 1 and best.order.count("(") == n - 1


def test_dynamic_programming_is_not_left_to_right():
    # [1000, 1]·[1, 1000]·[1000, 1]: right first is a tiny product, left first a huge one
    shapes = [(1000, 1), (1, 1000), (1000, 1)]
    best = best_bracketing(shapes, names=["u", "v", "w"])
    assert str(best) == "(u·(v·w))" and best.tree == (0, (1, 2))
    assert best.cost.flops == 2 * 1 * 1000 * 1 + 2 * 1000 * 1 * 1


def test_tree_prints_with_names():
    b = best_bracketing([(2048, 4096), (4096, 16), (16, 4096)], names=["x", "Aᵀ", "Bᵀ"])
    assert str(b) == "((x·Aᵀ)·Bᵀ)" and b.tree == ((0, 1), 2)
    assert best_bracketing([(3, 4)]).order == "M0"


def test_chain_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not chain"):
        best_bracketing([(2, 3), (4, 5)])
    with pytest.raises(ValueError, match="at least one"):
        best_bracketing([])
    with pytest.raises(ValueError, match="positive int"):
        best_bracketing([(0, 3)])
    with pytest.raises(ValueError, match="names"):
        best_bracketing([(2, 3)], names=["a", "b"])
    with pytest.raises(ValueError, match="positive"):
        DeviceRates(flops=0.0)


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


def test_device_rates_default_off_gpu():
    if torch.cuda.is_available():
        pytest.skip("measures on a GPU here")
    assert measure_device_rates() is DEFAULT_RATES
    assert measure_device_rates("cpu") is DEFAULT_RATES


@pytest.mark.gpu
def test_device_rates_measured_on_gpu():
    rates = measure_device_rates()
    assert measure_device_rates(torch.device("cuda", torch.cuda.current_device())) is rates  # cached
    assert "measured" in rates.name
    # broad sanity bounds: any current datacenter GPU is within these
    assert 1e13 < rates.flops < 5e15 and 1e11 < rates.bandwidth < 2e13 and 1e12 < rates.flops_fp32 < rates.flops


def test_fp32_adapters_cost_the_fused_op_no_more_than_16_bit_ones():
    """lowrank_mm reads the 16-bit operands as they are: PEFT pays for the fp32 copies, we do not."""
    same = lora_plan(16384, 4096, 11008, 16, 2)
    mixed = lora_plan(16384, 4096, 11008, 16, 2, adapter_elem_bytes=4)
    for form in ("forward factored", "dX factored"):
        assert mixed.predicted[form] == pytest.approx(same.predicted[form], rel=0.01)
    for form in ("forward peft", "dX peft"):
        assert mixed.predicted[form] > same.predicted[form]
    assert mixed.saving() > same.saving()
