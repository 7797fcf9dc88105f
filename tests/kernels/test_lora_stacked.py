"""The stacked form of the fused LoRA linears (x·[W; A]ᵀ and dY·[W | B]) against float64 references."""

import math

import pytest
import torch
from test_lora import FACTORED, MERGED, STACKED, bnb_layer, check_group, clear_plan_caches, make, rel

import sloth_fx.kernels.lora_function as lora_function
from sloth_fx.kernels.lora import lora_linear, lora_linear_group, lora_linear_group_reference
from sloth_fx.kernels.lora_plan import LoRAPlan
from sloth_fx.memory.saved_products import SavedProducts, products_saved

ODD = [  # (leading dims, in, outs, ranks): odd sizes, ragged ranks, and round ones
    ((37,), 45, [29], [3]),
    ((37,), 45, [29, 64, 5], [3, 7, 1]),
    ((5, 7), 45, [29, 29], [7, 3]),
    ((64,), 64, [128, 128, 128], [16, 16, 16]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,i,outs,ranks", ODD)
@pytest.mark.parametrize("bias", [False, True])
def test_stacked_against_float64(dtype, lead, i, outs, ranks, bias):
    """y, dX, dA, dB and the bias's gradient; siblings stacked together, their dX in one buffer."""
    check_group(lead, i, outs, ranks, [0.5, 2.0, -1.5][: len(outs)], dtype, seed=200 + len(outs) + i, bias=bias,
                plans=[STACKED] * len(outs))


@pytest.mark.parametrize("plans", [
    [STACKED, FACTORED, MERGED],
    [FACTORED, STACKED, STACKED],
    [LoRAPlan("stacked", "factored"), LoRAPlan("merged", "stacked"), LoRAPlan("factored", "stacked")],
], ids=["stacked-first", "stacked-after", "mixed-per-product"])
def test_stacked_beside_other_forms(plans):
    """A stacked sibling's dX accumulates onto (or is accumulated onto by) the others' in one buffer."""
    check_group((37,), 45, [29, 64, 5], [3, 7, 1], [0.5, 2.0, 4.0], torch.float32, seed=211, bias=True, plans=plans)


def test_stacked_with_a_trainable_base_weight():
    check_group((37,), 45, [29, 5], [3, 2], [1.0, 0.5], torch.float32, seed=212, bias=True, train_weights=True,
                plans=[STACKED, STACKED])


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every torch.empty / empty_like comes back full of NaN: a part of a buffer that the op
    forgets to write (the stacked sibling's columns of dX's buffer, of g, of xa) shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("plans", [
    [STACKED, STACKED, STACKED],
    [FACTORED, STACKED, MERGED],
    [LoRAPlan("stacked", "merged"), LoRAPlan("factored", "stacked"), FACTORED],
], ids=["all", "middle", "mixed-per-product"])
def test_stacked_leaks_no_unwritten_buffer(poisoned_buffers, plans):
    """Ranks 7, 3, 1: dX's buffer is as wide as the widest stacked sibling needs, and the narrower
    ones leave columns of it unwritten."""
    check_group((37,), 45, [29, 64, 5], [7, 3, 1], [0.5, 2.0, 1.0], torch.float32, seed=213, bias=True, plans=plans)


@pytest.mark.gpu
@pytest.mark.parametrize("host_bound_tokens", [0, 2**62], ids=["triton", "pytorch"])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
@pytest.mark.parametrize("lead,i,outs,ranks", ODD)
def test_stacked_in_bf16_on_gpu(poisoned_buffers, lead, i, outs, ranks, adapter_dtype, host_bound_tokens,
                                monkeypatch):
    """bf16 (fp32 adapters rounded to it: a forced plan) with the rank-r products in Triton and,
    for host-bound steps, in PyTorch; every fresh buffer NaN."""
    monkeypatch.setattr(lora_function, "HOST_BOUND_TOKENS", host_bound_tokens)
    check_group(lead, i, outs, ranks, [0.5, 2.0, -1.5][: len(outs)], torch.bfloat16, seed=220, bias=True,
                plans=[STACKED] * len(outs), adapter_dtype=adapter_dtype, device="cuda")


def test_stacked_output_is_contiguous_and_dx_a_view():
    """y is copied out of the [T, out + r] product (callers may need it contiguous); dX is left a
    view of [T, in + r], the r columns of dY·B to its right (autograd takes any strides)."""
    x, ws, as_, bs, _ = make((3, 37), 45, [29, 5], [3, 7], torch.float32, seed=214)
    ys = lora_linear_group(x, ws, as_, bs, [1.0, 2.0], plans=[STACKED, STACKED])
    assert all(y.is_contiguous() for y in ys)
    (dx,) = torch.autograd.grad(ys, [x], [torch.ones_like(y) for y in ys])
    assert dx.shape == x.shape and dx.stride() == (37 * (45 + 7), 45 + 7, 1)


def test_stacked_outputs_are_saved_and_handed_back_in_a_selective_recompute(monkeypatch):
    """The forward's y_i and xa go through remember(); the recompute takes them back and runs no product."""
    x, ws, as_, bs, bis = make((37,), 45, [29, 64], [3, 7], torch.float32, seed=215, bias=True)
    saved = SavedProducts()
    with products_saved(saved, replay=False):
        ys = lora_linear_group(x, ws, as_, bs, [0.5, 2.0], bis, plans=[STACKED, STACKED])
    (entry,) = saved.outputs.values()
    kept = entry[0]
    assert saved.count == 1 and [t.shape for t, _ in kept] == [(37, 29), (37, 64), (37, 10)]
    assert all(t.data_ptr() == y.data_ptr() for (t, _), y in zip(kept, ys))

    def no_products(*args):
        raise AssertionError("the recompute ran the products")

    monkeypatch.setattr(lora_function, "_products", no_products)
    with products_saved(saved, replay=True):
        again = lora_linear_group(x, ws, as_, bs, [0.5, 2.0], bis, plans=[STACKED, STACKED])
    assert all(torch.equal(a, y) for a, y in zip(again, ys))
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(again, [x, *as_, *bs], dys)
    refs = lora_linear_group_reference(x.double(), [w.double() for w in ws], [a.double() for a in as_],
                                       [b.double() for b in bs], [0.5, 2.0], [b.double() for b in bis])
    for got, ref in zip(grads, torch.autograd.grad(refs, [x, *as_, *bs], [d.double() for d in dys])):
        assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("dtype,adapter_dtype,stacks", [
    (torch.float32, torch.float32, True), (torch.float16, torch.float16, True), (torch.float16, torch.float32, False),
])
@pytest.mark.parametrize("lead,i,out,r,product", [((256,), 8192, 112, 16, "stacked_forward"),
                                                  ((256,), 16, 512, 8, "stacked_dx")])
def test_cost_model_stacks_only_adapters_in_the_compute_dtype(dtype, adapter_dtype, stacks, lead, i, out, r, product,
                                                              monkeypatch):
    """Shapes where the roofline prices stacked cheapest (a forward whose in is far above 2·out;
    a dX at T far above 2·in): taken with adapters in the compute dtype, never with fp32 adapters
    on a 16-bit base (stacking would round them), and right either way."""
    calls = []
    real = getattr(lora_function, product)
    monkeypatch.setattr(lora_function, product, lambda *a: calls.append(1) or real(*a))
    clear_plan_caches()
    check_group(lead, i, [out], [r], [2.0], dtype, seed=216, bias=True, adapter_dtype=adapter_dtype)
    assert bool(calls) == stacks
    clear_plan_caches()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stacked_over_a_4bit_base(dtype):
    """The dequantized W stacked with A (rows) and with B (columns): against float64 of the
    dequantized weight, a group of a 4-bit and a dense sibling."""
    from sloth_fx.kernels import toolkit

    layer = bnb_layer(dtype, "nf4", True, False, seed=217, in_f=45, out_f=29, r=3)
    w = layer.base_layer.weight
    dense = toolkit.dense_weight(w, torch.float64)
    x, _, as_, bs, bis = make((37,), 45, [29, 29], [3, 5], dtype, seed=218, bias=True)
    ys = lora_linear_group(x, [w, dense.to(dtype)], as_, bs, [2.0, 0.5], bis, plans=[STACKED, STACKED])
    dys = [torch.randn_like(y) for y in ys]
    grads = torch.autograd.grad(ys, [x, *as_, *bs], dys)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, *as_, *bs)]
    refs = lora_linear_group_reference(leaves64[0], [dense, dense], leaves64[1:3], leaves64[3:], [2.0, 0.5],
                                       [b.double() for b in bis])
    ref_grads = torch.autograd.grad(refs, leaves64, [d.double() for d in dys])
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for got, ref in zip([*ys, *grads], [*refs, *ref_grads]):
        assert torch.isfinite(got).all() and rel(got, ref) < tol, rel(got, ref)


def test_xd_still_refuses_a_stacked_plan():
    x, ws, as_, bs, _ = make((4,), 24, [40], [4], torch.float32, seed=219)
    with pytest.raises(ValueError, match="factored"):
        lora_linear(x, ws[0], as_[0], bs[0], 1.0, xd=x.detach().clone(), plan=STACKED)
