"""Fused LoRA linears against float64 references, against PEFT's own layers (dense and 4-bit)."""

import itertools

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import sloth_fx.kernels.lora_forms as lora_forms
import sloth_fx.kernels.lora_function as lora_function
import sloth_fx.kernels.lora_stack as lora_stack
import sloth_fx.kernels.lora_thin as lora_thin
from sloth_fx.kernels import toolkit
from sloth_fx.kernels.lora import (
    lora_linear,
    lora_linear_group,
    lora_linear_group_reference,
    lora_linear_group_supports,
    lora_linear_reference,
    lora_linear_supports,
)
from sloth_fx.kernels.lora_function import HOST_BOUND_TOKENS
from sloth_fx.kernels.lora_plan import LoRAPlan

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Errors relative to the magnitudes of the terms (rel_to): a few units of each dtype's rounding (unit
# roundoff fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3). Over 150 seeds of every SHAPES case the largest were
# 8.3e-8 (fp32) and 1.6e-4 (fp16). bf16 runs only on the GPU: its 2e-2, five units, matches fp16's
# four units and TOL's bf16 bound; it passed on an H200 (2026-11-30), its largest error not recorded.
MAGNITUDE_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
FACTORED, MERGED, STACKED = LoRAPlan("factored", "factored"), LoRAPlan("merged", "merged"), LoRAPlan("stacked", "stacked")
PLANS = [FACTORED, MERGED, STACKED]


def clear_plan_caches():
    """Plans are cached per shape: a test that fakes the cost model starts and ends with none."""
    lora_forms.group_plans.cache_clear()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(lead, i, outs, ranks, dtype, seed, bias=False, adapter_dtype=None, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ad = adapter_dtype or dtype
    x = torch.randn(*lead, i, generator=g).to(device, dtype).requires_grad_()
    ws = [torch.randn(o, i, generator=g).div(i ** 0.5).to(device, dtype) for o in outs]
    as_ = [torch.randn(r, i, generator=g).div(i ** 0.5).to(device, ad).requires_grad_() for r in ranks]
    bs = [torch.randn(o, r, generator=g).div(r ** 0.5).to(device, ad).requires_grad_() for o, r in zip(outs, ranks)]
    bis = [torch.randn(o, generator=g).to(device, dtype).requires_grad_() if bias else None for o in outs]
    return x, ws, as_, bs, bis


def check_group(lead, i, outs, ranks, scales, dtype, seed, bias=False, plans=None, adapter_dtype=None,
                train_weights=False, device="cpu"):
    x, ws, as_, bs, bis = make(lead, i, outs, ranks, dtype, seed, bias, adapter_dtype, device)
    if train_weights:
        ws = [w.requires_grad_() for w in ws]
    ys = lora_linear_group(x, ws, as_, bs, scales, bis, plans=plans)
    leaves = [x, *(ws if train_weights else []), *as_, *bs, *[b for b in bis if b is not None]]
    g = torch.Generator().manual_seed(seed + 1)
    dys = [torch.randn(y.shape, generator=g).to(y.device, y.dtype) for y in ys]
    grads = torch.autograd.grad(ys, leaves, dys)
    for y in ys:
        assert y.dtype == dtype  # the base dtype, as PEFT casts back
    for leaf, gr in zip(leaves, grads):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape

    def reference(d64, magnitude):
        it = iter(d64)
        x64 = next(it)
        w64 = [next(it) for _ in outs] if train_weights else [_fp64(w, magnitude) for w in ws]
        a64 = [next(it) for _ in outs]
        b64 = [next(it) for _ in outs]
        bias64 = [next(it) for _ in outs] if bias else [None] * len(outs)
        return lora_linear_group_reference(x64, w64, a64, b64, [abs(s) if magnitude else s for s in scales], bias64)

    assert_close_to_fp64(ys, grads, leaves, dys, reference, dtype)


def _fp64(t, magnitude):
    return t.detach().double().abs() if magnitude else t.detach().double()


def assert_close_to_fp64(ys, grads, leaves, dys, reference, dtype):
    """``ys`` and their gradients at ``leaves`` (upstream ``dys``) against ``reference(leaves64,
    False)``, the maths in float64. Each error is bounded by the magnitudes of the terms that make
    the result: ``reference(|leaves64|, True)`` with ``|dys|``, where ``reference`` takes the
    absolute values of its own constants too, gives each output and gradient as the sum of the
    magnitudes of its terms, the scale of the rounding error. A result that cancels can be far
    smaller than that (T = 1 and r = 1 make xa and g single dot products), so bounding by the result
    failed on some seeds."""
    def run(magnitude):
        d64 = [_fp64(t, magnitude).requires_grad_() for t in leaves]
        outs = reference(d64, magnitude)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return [*outs, *torch.autograd.grad(outs, d64, [_fp64(d, magnitude) for d in dys])]

    for got, exact, magnitude in zip([*ys, *grads], run(False), run(True)):
        assert got.shape == exact.shape and torch.isfinite(got).all()
        assert rel_to(got, exact, magnitude) < MAGNITUDE_TOL[dtype], rel_to(got, exact, magnitude)


def rel_to(a, ref, magnitude):
    """``|a - ref|`` relative to the magnitudes of the terms that make ``ref``."""
    return ((a.double() - ref.double()).norm() / magnitude.double().norm().clamp_min(1e-30)).item()


SHAPES = [  # (leading dims, in, outs, ranks): T = 1, 7, 33; r > in allowed
    ((1,), 24, [40], [1]),
    ((7,), 40, [24, 96], [8, 16]),
    ((3, 11), 96, [40, 40, 24], [16, 64, 8]),
    ((1, 7), 24, [96, 24], [64, 1]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.forward)
@pytest.mark.parametrize("lead,i,outs,ranks", SHAPES)
def test_group_against_float64(dtype, plan, lead, i, outs, ranks):
    seed = hash((lead, i, str(dtype), plan.forward)) % 10_000
    check_group(lead, i, outs, ranks, [0.5, 2.0, 1.0][: len(outs)], dtype, seed, plans=[plan] * len(outs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_scales_and_mixed_plans(dtype):
    for k, scales in enumerate([[1.0, 1.0], [0.125, 4.0], [-2.0, 32.0]]):
        check_group((5,), 24, [40, 96], [4, 16], scales, dtype, seed=30 + k, bias=True, plans=[FACTORED, MERGED])
        check_group((5,), 24, [40, 96], [4, 16], scales, dtype, seed=40 + k, bias=True,
                    plans=[LoRAPlan("merged", "factored"), LoRAPlan("factored", "merged")])


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.forward)
def test_fp32_adapters_on_a_half_base_against_float64(plan):
    check_group((7,), 40, [24, 96], [8, 16], [0.5, 2.0], torch.float16, seed=51, bias=True,
                adapter_dtype=torch.float32, plans=[plan, plan])


def test_fp64_adapters_on_an_fp32_base_get_fp64_gradients():
    """The adapters' gradients are summed in the widest operand's dtype: fp64 adapters over an fp32
    model get float64-accurate dA and dB (summed in fp32 they were off by ~1e-7)."""
    x, ws, as_, bs, _ = make((9,), 24, [40, 16], [4, 8], torch.float32, seed=57, adapter_dtype=torch.float64)
    ys = lora_linear_group(x, ws, as_, bs, [0.5, 2.0])
    dys = [torch.randn(y.shape, generator=torch.Generator().manual_seed(58)) for y in ys]
    grads = torch.autograd.grad(ys, [*as_, *bs], dys)
    a64, b64 = [a.detach().requires_grad_() for a in as_], [b.detach().requires_grad_() for b in bs]
    refs = lora_linear_group_reference(x.detach().double(), [w.double() for w in ws], a64, b64, [0.5, 2.0], [None, None])
    ref_grads = torch.autograd.grad(refs, [*a64, *b64], [d.double() for d in dys])
    for gr, r in zip(grads, ref_grads):
        assert gr.dtype == torch.float64 and rel(gr, r) < 1e-12, rel(gr, r)


def test_trainable_base_weight_gets_its_gradient():
    check_group((6,), 24, [40, 24], [4, 8], [1.0, 0.5], torch.float32, seed=61, bias=True, train_weights=True)


def test_default_plan_comes_from_the_cost_model():
    check_group((33,), 96, [40, 24], [16, 8], [2.0, 1.0], torch.float32, seed=71)  # plans=None
    check_group((33,), 96, [40], [16], [2.0], torch.float16, seed=72)


def test_cost_model_consulted_per_linear(monkeypatch):
    seen = []

    def fake_plan(tokens, in_features, out_features, rank, elem_bytes, rates, **kw):
        seen.append((tokens, in_features, out_features, rank, elem_bytes, kw["adapter_elem_bytes"], kw["training"],
                     kw["siblings"], kw["base_4bit"]))
        return MERGED

    monkeypatch.setattr(lora_forms, "lora_plan", fake_plan)
    clear_plan_caches()  # plans are cached per shape: start from none
    check_group((3, 5), 40, [24, 96], [8, 16], [0.5, 2.0], torch.float32, seed=81)
    assert seen == [(15, 40, 24, 8, 4, 4, True, 2, False), (15, 40, 96, 16, 4, 4, True, 2, False)]
    seen.clear()
    with torch.no_grad():
        lora_linear(*[t[0] if isinstance(t, list) else t for t in make((2,), 24, [40], [4], torch.float32, 1)[:4]], 1.0)
    assert seen[0][6] is False
    clear_plan_caches()  # forget the fake plans


def test_single_matches_reference_and_group():
    x, ws, as_, bs, bis = make((4, 3), 24, [40], [4], torch.float32, seed=9, bias=True)
    for plan in (None, *PLANS):
        out = lora_linear(x, ws[0], as_[0], bs[0], 2.0, bis[0], plan=plan)
        torch.testing.assert_close(out, lora_linear_reference(x, ws[0], as_[0], bs[0], 2.0, bis[0]))


def test_non_contiguous_input():
    x, ws, as_, bs, _ = make((8,), 48, [40], [8], torch.float32, seed=12)
    xt = x.detach()[:, ::2].requires_grad_()  # stride 2 in the last dim
    assert not xt.is_contiguous()
    out = lora_linear(xt, ws[0][:, :24].contiguous(), as_[0][:, :24].detach().requires_grad_(), bs[0], 1.5)
    ref = lora_linear_reference(xt.double(), ws[0][:, :24].double(), as_[0][:, :24].double(), bs[0].double(), 1.5)
    assert rel(out, ref) < 1e-5
    (g,) = torch.autograd.grad(out.sum(), xt)
    (g_ref,) = torch.autograd.grad(lora_linear_reference(xt, ws[0][:, :24], as_[0][:, :24], bs[0], 1.5).sum(), xt)
    assert rel(g, g_ref) < 1e-5


def test_only_what_requires_grad_is_computed_and_saved():
    x, ws, as_, bs, _ = make((5,), 24, [40], [4], torch.float32, seed=13)
    x = x.detach()  # no dX
    a = as_[0].detach()  # frozen A: x need not be saved
    y = lora_linear(x, ws[0], a, bs[0], 1.0)
    saved = y.grad_fn.saved_tensors
    assert not any(t is not None and t.shape == x.shape for t in saved)
    (gb,) = torch.autograd.grad(y.sum(), bs[0])
    (gb_ref,) = torch.autograd.grad(lora_linear_reference(x, ws[0], a, bs[0], 1.0).sum(), bs[0])
    assert rel(gb, gb_ref) < 1e-5


def test_unused_sibling_output_counts_as_zero_gradient():
    x, ws, as_, bs, _ = make((6,), 24, [40, 24], [4, 8], torch.float32, seed=14)
    ys = lora_linear_group(x, ws, as_, bs, [1.0, 2.0])
    grads = torch.autograd.grad(ys[0].sum(), [x, *as_, *bs], allow_unused=True)
    refs = lora_linear_group_reference(x, ws, as_, bs, [1.0, 2.0])
    ref_grads = torch.autograd.grad(refs[0].sum(), [x, *as_, *bs], allow_unused=True)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-5, atol=1e-6)


# ---- against PEFT's own layers -----------------------------------------------------------------


def peft_layer(dtype, bias, autocast_adapter_dtype, seed, in_f=48, out_f=40, r=8, alpha=16):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]),
                           autocast_adapter_dtype=autocast_adapter_dtype)
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # PEFT starts B at zero
    return layer


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, True), (torch.float16, True), (torch.float16, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_against_peft_linear(dtype, autocast, bias):
    layer = peft_layer(dtype, bias, autocast, seed=3)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == (torch.float32 if autocast else dtype)
    x = torch.randn(2, 7, 48).to(dtype).requires_grad_()
    ref = layer(x)
    out = lora_linear(x, layer.base_layer.weight, a, b, layer.scaling["default"], layer.base_layer.bias)
    assert out.dtype == ref.dtype and torch.isfinite(out).all() and rel(out, ref) < TOL[dtype]
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, a, b), dy)
    grads = torch.autograd.grad(out, (x, a, b), dy)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and torch.isfinite(g).all() and rel(g, r) < 2 * TOL[dtype]


# ---- bitsandbytes 4-bit base -------------------------------------------------------------------


def bnb_layer(dtype, quant_type, double_quant, bias, seed, in_f=48, out_f=40, r=8, device="cpu"):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, quant_type=quant_type,
                            compress_statistics=double_quant)
    w = torch.randn(out_f, in_f, generator=g).div(in_f ** 0.5).to(dtype)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant)
    if bias:
        lin.bias = nn.Parameter(torch.randn(out_f, generator=g).to(dtype), requires_grad=False)
    lin = lin.to(device)  # quantizes
    layer = PeftLinear4bit(lin, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0), r=r,
                           lora_alpha=2 * r).to(device)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant_type,double_quant", list(itertools.product(["nf4", "fp4"], [False, True])))
@pytest.mark.parametrize("bias", [False, True])
def test_4bit_against_peft_linear4bit(dtype, quant_type, double_quant, bias):
    layer = bnb_layer(dtype, quant_type, double_quant, bias, seed=5)
    w = layer.base_layer.weight
    assert w.quant_state is not None and w.quant_state.nested == double_quant
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 48).to(dtype).requires_grad_()
    ref = layer(x)
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, a, b), dy)
    for plan in PLANS:
        out = lora_linear(x, w, a, b, layer.scaling["default"], layer.base_layer.bias, plan=plan)
        assert out.dtype == ref.dtype and torch.isfinite(out).all() and rel(out, ref) < TOL[dtype]
        # the dequantized [out, in] weight is not kept for backward
        assert not any(t is not None and t.shape == (40, 48) for t in out.grad_fn.saved_tensors)
        grads = torch.autograd.grad(out, (x, a, b), dy)
        for g, r in zip(grads, ref_grads):
            assert g.dtype == r.dtype and torch.isfinite(g).all() and rel(g, r) < 2 * TOL[dtype]


def test_4bit_against_float64_of_the_dequantized_weight():
    layer = bnb_layer(torch.float32, "nf4", True, True, seed=6)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    dense = toolkit.dense_weight(w, torch.float64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(9, 48).requires_grad_()
    ys = lora_linear_group(x, [w, dense.float()], [a, a], [b, b], [2.0, 2.0], [bias, bias])
    ref = lora_linear_reference(x.double(), dense, a.double(), b.double(), 2.0, bias.double())
    for y in ys:
        assert rel(y, ref) < 1e-5


# ---- bad inputs --------------------------------------------------------------------------------


def test_bad_inputs_are_refused():
    x, ws, as_, bs, bis = make((3,), 24, [40], [4], torch.float32, seed=1)
    with pytest.raises(ValueError, match="one A, B"):
        lora_linear_group(x, ws, as_, [], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        lora_linear_group(x, [], [], [], [])
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear_group(x, ws, [torch.randn(4, 20)], bs, [1.0])
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear(x, ws[0], as_[0], torch.randn(41, 4), 1.0)
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear(x[:, :20], ws[0], as_[0], bs[0], 1.0)
    with pytest.raises(TypeError, match="weight 0 is torch.float16"):
        lora_linear(x, ws[0].half(), as_[0], bs[0], 1.0)
    with pytest.raises(TypeError, match="share one dtype"):
        lora_linear(x, ws[0], as_[0], bs[0].double(), 1.0)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        lora_linear(x.long(), ws[0], as_[0], bs[0], 1.0)
    with pytest.raises(ValueError, match="bias 0"):
        lora_linear(x, ws[0], as_[0], bs[0], 1.0, torch.randn(41))
    with pytest.raises(ValueError, match="bias 0"):
        lora_linear(x, ws[0], as_[0], bs[0], 1.0, torch.randn(40).double())
    with pytest.raises(ValueError, match="scale 0"):
        lora_linear(x, ws[0], as_[0], bs[0], float("nan"))
    with pytest.raises(ValueError, match="2-D"):
        lora_linear(x, ws[0][None], as_[0], bs[0], 1.0)
    with pytest.raises(ValueError, match="plans"):
        lora_linear_group(x, ws, as_, bs, [1.0], plans=[FACTORED, FACTORED])
    with pytest.raises(ValueError, match="on meta"):
        lora_linear(x, ws[0].to("meta"), as_[0], bs[0], 1.0)


def test_supports_answers_what_the_op_raises():
    x, ws, as_, bs, _ = make((3,), 24, [40], [4], torch.float32, seed=1)
    w, a, b = ws[0], as_[0], bs[0]
    assert lora_linear_supports(x, w, a, b, 1.0) is None and lora_linear_group_supports(x, ws, as_, bs, [1.0]) is None
    assert "one A, B" in lora_linear_group_supports(x, ws, as_, [], [1.0])
    assert "do not chain" in lora_linear_supports(x, w, a, torch.randn(41, 4), 1.0)
    assert "weight 0 is torch.float16" in lora_linear_supports(x, w.half(), a, b, 1.0)
    assert "share one dtype" in lora_linear_supports(x, w, a, b.double(), 1.0)
    assert "dtype torch.int64" in lora_linear_supports(x.long(), w, a, b, 1.0)
    assert "scale 0" in lora_linear_supports(x, w, a, b, float("nan"))
    assert "on meta" in lora_linear_supports(x, w.to("meta"), a, b, 1.0)
    assert "adapters' dtype" in lora_linear_supports(x, w, a, b, 1.0, xd=x.half())


def test_supports_takes_fake_tensors():
    with FakeTensorMode():
        x, w = torch.empty(2, 5, 64, dtype=torch.bfloat16), torch.empty(32, 64, dtype=torch.bfloat16)
        a, b = torch.empty(8, 64), torch.empty(32, 8)
        assert lora_linear_supports(x, w, a, b, 2.0, xd=x.float()) is None
        assert lora_linear_group_supports(x, [w, w], [a, a], [b, b], [1.0, 0.5]) is None
        assert "needs them alike" in lora_linear_supports(x, w.float(), a, b, 2.0)


# ---- GPU: bf16, and the 4-bit scratch buffer -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("host_bound_tokens", [0, 2**62], ids=["triton", "pytorch"])
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.forward)
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
@pytest.mark.parametrize("lead,i,outs,ranks", SHAPES + [((2, 1000), 512, [512, 128, 128], [16, 16, 16])])
def test_bf16_on_gpu(plan, adapter_dtype, lead, i, outs, ranks, host_bound_tokens, monkeypatch):
    """Both ways of running the rank-r products: the Triton kernel and, for host-bound steps, PyTorch."""
    monkeypatch.setattr(lora_function, "HOST_BOUND_TOKENS", host_bound_tokens)
    check_group(lead, i, outs, ranks, [0.5, 2.0, 1.0][: len(outs)], torch.bfloat16, seed=91, bias=True,
                plans=[plan] * len(outs), adapter_dtype=adapter_dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("plan", [None, STACKED], ids=["cost-model", "stacked"])
def test_4bit_on_gpu_with_poisoned_scratch(dtype, quant_type, double_quant, plan):
    layer = bnb_layer(dtype, quant_type, double_quant, True, seed=7, in_f=256, out_f=128, r=16, device="cuda")
    w = layer.base_layer.weight
    toolkit.release_dequant_scratch()
    key = (w.device, tuple(w.quant_state.shape), w.quant_state.dtype)
    toolkit._SCRATCH[key] = torch.full(tuple(w.quant_state.shape), float("nan"), dtype=w.quant_state.dtype, device="cuda")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, 33, 256, device="cuda", dtype=dtype, requires_grad=True)
    ref = layer(x)
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, a, b), dy)
    out = lora_linear(x, w, a, b, layer.scaling["default"], layer.base_layer.bias, plan=plan)
    grads = torch.autograd.grad(out, (x, a, b), dy)
    assert torch.isfinite(out).all() and rel(out, ref) < TOL[dtype]
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel(g, r) < 2 * TOL[dtype]
    assert toolkit._SCRATCH[key].isfinite().all()  # the scratch was written, and reused
    toolkit.release_dequant_scratch()


# ---- host-side caching ---------------------------------------------------------------------------


def test_caches_never_change_a_result_when_shapes_change(monkeypatch):
    """T = 5, 17, 5 through one op: each call against float64, a plan decided per token count
    (and reused, not re-decided, when T comes back), the checks run once per signature."""
    calls = []
    real_plan = lora_forms.lora_plan

    def spy(tokens, *args, **kw):
        calls.append(tokens)
        return real_plan(tokens, *args, **kw)

    monkeypatch.setattr(lora_forms, "lora_plan", spy)
    clear_plan_caches()
    for t in (5, 17, 5):
        check_group((t,), 40, [24, 96, 24], [8, 8, 8], [0.5, 2.0, 1.0], torch.float32, seed=100 + t, bias=True)
    assert calls == [5, 5, 5, 17, 17, 17]  # one plan per linear per new token count
    clear_plan_caches()


@pytest.mark.parametrize("tokens", [HOST_BOUND_TOKENS - 1, HOST_BOUND_TOKENS])
def test_one_host_bound_decision_per_call(tokens, monkeypatch):
    """Every rank-r product of a call, forward and backward, is told the same thing: host-bound
    below HOST_BOUND_TOKENS tokens, not from there on."""
    told = []

    def spy(real):
        def call(*args, host_bound, **kw):
            told.append(host_bound)
            return real(*args, host_bound=host_bound, **kw)
        return call

    for module, name in ((lora_function, "lowrank_mm"), (lora_function, "runs_wide"), (lora_thin, "lowrank_mm"),
                         (lora_thin, "split_k_for"), (lora_stack, "lowrank_mm")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    check_group((tokens,), 8, [8, 12], [2, 2], [0.5, 2.0], torch.float32, seed=5)
    assert len(told) >= 6 and set(told) == {tokens < HOST_BOUND_TOKENS}


def test_grouped_split_k_partials_match_one_product_each(monkeypatch):
    """With K split (as on a GPU), the siblings' g and dB partial sums share one buffer: the
    result is that of one lowrank_mm per product."""
    import sloth_fx.kernels.lowrank_mm as mm_mod

    monkeypatch.setattr(mm_mod, "_programs_wanted", lambda device: 64)
    mm_mod._launch.cache_clear()
    try:
        x, ws, as_, bs, _ = make((1056,), 24, [1040, 1100], [4, 4], torch.float32, seed=15)  # K >= 1024: split
        ys = lora_linear_group(x, ws, as_, bs, [1.0, 0.5], plans=[FACTORED, FACTORED])
        dys = [torch.randn_like(y) for y in ys]
        grads = torch.autograd.grad(ys, [x, *as_, *bs], dys)
        assert mm_mod.split_k_for(dys[0], bs[0]) > 1 and mm_mod.split_k_for(dys[0].t(), torch.empty(1056, 4)) > 1
        g = [mm_mod.lowrank_mm(dy, b, alpha=s) for dy, b, s in zip(dys, bs, [1.0, 0.5])]
        xa = [mm_mod.lowrank_mm(x.detach(), a.detach().t()) for a in as_]
        for db, dy, xa_i, s in zip(grads[3:], dys, xa, [1.0, 0.5]):
            assert torch.equal(db, mm_mod.lowrank_mm(dy.t(), xa_i, alpha=s))
        assert torch.equal(grads[1], mm_mod.lowrank_mm(g[0].t(), x.detach()))
        refs = lora_linear_group_reference(*[[t.double() for t in v] if isinstance(v, list) else v.double()
                                             for v in (x, ws, as_, bs)], [1.0, 0.5])
        ref_grads = torch.autograd.grad(refs, [x, *as_, *bs], [d.double() for d in dys])
        for got, ref in zip(grads, ref_grads):
            assert rel(got, ref) < 1e-5
    finally:
        mm_mod._launch.cache_clear()


# --------------------------------------------------------------------------------------------
# The adapters' own input xd (PEFT's dropout(x)): y = x·Wᵀ + s·(xd·Aᵀ)·Bᵀ
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.float16, None),
                                                 (torch.float16, torch.float32)])
@pytest.mark.parametrize("lead,i,out,r", [((1,), 24, 40, 1), ((7,), 40, 96, 16), ((3, 11), 96, 24, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_dropped_out_adapter_input_against_float64(dtype, adapter_dtype, lead, i, out, r, bias):
    """x feeds the base product only and xd the adapters only: dX = dY·W, d(xd) = s·dY·B·A, dA from xd."""
    x, ws, as_, bs, bis = make(lead, i, [out], [r], dtype, seed=hash((lead, i, str(dtype))) % 10_000, bias=bias,
                               adapter_dtype=adapter_dtype)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(x.shape, generator=g) > 0.3).to(as_[0].dtype)
    xd = (x.detach().to(as_[0].dtype) * mask / 0.7).requires_grad_()  # a dropout of x, not x
    y = lora_linear(x, ws[0], as_[0], bs[0], 1.5, bis[0], xd=xd)
    leaves = [x, xd, as_[0], bs[0], *([bis[0]] if bias else [])]
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    assert y.dtype == dtype and all(gr.dtype == leaf.dtype for leaf, gr in zip(leaves, grads))

    def reference(d64, magnitude):
        return lora_linear_reference(d64[0], _fp64(ws[0], magnitude), d64[2], d64[3], 1.5, d64[4] if bias else None,
                                     xd=d64[1])

    assert_close_to_fp64([y], grads, leaves, [dy], reference, dtype)


def test_xd_equal_to_x_is_the_plain_op():
    """xd = x through the other path: the same forward, and dX + d(xd) is the plain op's dX."""
    x, ws, as_, bs, bis = make((5, 3), 40, [24], [8], torch.float32, seed=91, bias=True)
    xd = x.detach().clone().requires_grad_()
    y = lora_linear(x, ws[0], as_[0], bs[0], 2.0, bis[0], xd=xd)
    y_ref = lora_linear(x, ws[0], as_[0], bs[0], 2.0, bis[0], plan=FACTORED)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn_like(y)
    dx, dxd, da = torch.autograd.grad(y, [x, xd, as_[0]], dy)
    dx_ref, da_ref = torch.autograd.grad(y_ref, [x, as_[0]], dy)
    torch.testing.assert_close(dx + dxd, dx_ref)
    torch.testing.assert_close(da, da_ref, rtol=0, atol=0)


def test_xd_checks():
    x, ws, as_, bs, _ = make((4,), 24, [40], [4], torch.float16, seed=1, adapter_dtype=torch.float32)
    with pytest.raises(ValueError, match="adapters' dtype"):
        lora_linear(x, ws[0], as_[0], bs[0], 1.0, xd=x)  # x is fp16, the adapters fp32
    with pytest.raises(ValueError, match="shape"):
        lora_linear(x, ws[0], as_[0], bs[0], 1.0, xd=x[:2].float())
    with pytest.raises(ValueError, match="factored"):
        lora_linear(x, ws[0], as_[0], bs[0], 1.0, xd=x.float(), plan=MERGED)
