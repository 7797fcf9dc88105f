"""The cost model: dynamic programming against brute force, and LoRA plans as functions of shape."""

import random

import pytest

from sloth_fx.cost_model import best_bracketing, enumerate_bracketings, lora_plan, matmul_cost


def test_single_product_cost():
    c = matmul_cost(8, 16, 32, elem_bytes=2)
    assert c.flops == 2 * 8 * 16 * 32 and c.bytes == (8 * 16 + 16 * 32 + 8 * 32) * 2


@pytest.mark.parametrize("seed", range(12))
def test_dynamic_programming_matches_brute_force(seed):
    rng = random.Random(seed)
    dims = [rng.choice([1, 3, 16, 64, 100, 4096, 11008]) for _ in range(rng.randint(3, 8))]
    shapes = list(zip(dims, dims[1:]))
    best = best_bracketing(shapes)
    brute = min(b.cost.seconds for b in enumerate_bracketings(shapes))
    assert best.cost.seconds == pytest.approx(brute, rel=1e-12)
    assert best.order.count("·") == len(shapes) - 1


def test_chain_errors_name_the_problem():
    with pytest.raises(ValueError, match="do not chain"):
        best_bracketing([(2, 3), (4, 5)])
    with pytest.raises(ValueError, match="at least one"):
        best_bracketing([])


def test_lora_plan_never_merges_in_16_bit():
    plan = lora_plan(16384, 4096, 4096, 16, elem_bytes=2)
    assert plan.forward == "factored" and plan.backward_dx == "factored" and plan.saving() == 0.0


def test_lora_plan_in_float32_flips_with_the_token_count():
    # few tokens: building W + s·B·A ([out, in]) costs more than a second pass over [tokens, out]
    small = lora_plan(16, 4096, 4096, 16, elem_bytes=4)
    assert small.forward == "factored" and small.backward_dx == "factored"
    # many tokens: the second pass over the [tokens, out] result dominates; merging saves it
    large = lora_plan(65536, 4096, 4096, 16, elem_bytes=4)
    assert large.forward == "merged" and large.backward_dx == "merged" and large.saving() > 0


def test_lora_plan_is_cached_per_shape():
    lora_plan.cache_clear()
    lora_plan(4096, 4096, 11008, 16)
    lora_plan(4096, 4096, 11008, 16)
    assert lora_plan.cache_info().hits == 1
