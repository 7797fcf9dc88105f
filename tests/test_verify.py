"""verify: a rewrite is judged by its distance from a float64 run of the original, against the
original's own distance (sloth_fx/rewrite/verify.py)."""

import pytest
import torch
import torch.fx as fx
from tiny_models import assert_same_training_step, batch, tiny_model, twin, wrong_norm_pass

import sloth_fx
from sloth_fx.kernels.rmsnorm import rmsnorm
from sloth_fx.rewrite.verify import compare


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_keep_correct_lora_rewrites_and_drop_wrong_ones(dtype, scratch_passes):
    """PEFT keeps fp32 adapters: their gradients carry the half model's error, which the
    original makes too; a wrong norm after the LoRA rewrite is still caught."""
    sloth_fx.register_pass("wrong_norm_for_verify_test", wrong_norm_pass)
    original = tiny_model("llama", lora=True, dtype=dtype)
    optimized = sloth_fx.optimize(twin(original), passes=["lora", "wrong_norm_for_verify_test"], verify=True)
    assert_same_training_step(original, optimized, batch(), rtol=2e-2, atol=2e-3)
    assert sloth_fx.report(optimized).count("lora") == 14
    text = sloth_fx.explain(optimized)
    assert "each pass checked on random inputs" in text and "dropped by verify: lora" not in text
    assert "dropped by verify: wrong_norm_for_verify_test" in text


def _graph(fn) -> fx.GraphModule:
    return fx.symbolic_trace(fn)


def _x() -> list[torch.Tensor]:
    return [torch.randn(8, 16, requires_grad=True)]


def bf16_rounded(x):  # dtype constants, .float() and a factory: all float64 in the truth
    return (x.to(torch.bfloat16) * 3).float() + torch.zeros(16, dtype=torch.float16)


def test_the_truth_is_float64_not_the_originals_rounding():
    original = _graph(bf16_rounded)
    exact = compare(_graph(lambda x: x * 3), original, _x())
    assert exact.ok and exact.worst < 0.01  # far closer to the truth than the bf16 original
    assert compare(_graph(bf16_rounded), original, _x()).ok
    off = compare(_graph(lambda x: x * 3.1), original, _x())  # 3% off: beyond 4x bf16's rounding
    assert not off.ok and "against float64" in off.detail


def test_an_exact_original_leaves_one_rounding_of_room():
    original = _graph(lambda x: x * 2)
    assert compare(_graph(lambda x: x + x), original, _x()).ok
    assert not compare(_graph(lambda x: x * (2 * (1 + 1e-5))), original, _x()).ok


def test_nan_never_passes():
    verdict = compare(_graph(lambda x: x * 2 + torch.where(x == x.max(), float("nan"), 0.0)), _graph(lambda x: x * 2), _x())
    assert not verdict.ok and "nan" in verdict.detail


def test_fused_ops_in_the_original_run_as_their_references():
    """An earlier pass's fused op (here rmsnorm, which takes no float64) is in the original graph
    that the next pass is judged against: the truth runs its float64 reference instead."""
    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    g.output(g.call_function(rmsnorm, (x, w, 1e-6), {"normed_dtype": torch.bfloat16}))
    original = fx.GraphModule(torch.nn.Module(), g)
    inputs = [torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True), torch.ones(16, dtype=torch.bfloat16)]
    verdict = compare(fx.GraphModule(torch.nn.Module(), g), original, inputs)
    assert verdict.ok, verdict.detail
