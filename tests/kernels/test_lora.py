"""Fused LoRA linears against float64 references and against PEFT's own layer."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import sloth_fx.kernels.lora as lora_mod
from sloth_fx.cost_model import LoRAPlan
from sloth_fx.kernels.lora import lora_linear, lora_linear_group, lora_linear_reference

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(t, i, outs, ranks, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, i, generator=g).to(dtype).requires_grad_()
    ws = [torch.randn(o, i, generator=g).div(i ** 0.5).to(dtype) for o in outs]
    as_ = [torch.randn(r, i, generator=g).div(i ** 0.5).to(dtype).requires_grad_() for r in ranks]
    bs = [torch.randn(o, r, generator=g).to(dtype).requires_grad_() for o, r in zip(outs, ranks)]
    bis = [torch.randn(o, generator=g).to(dtype).requires_grad_() if bias else None for o in outs]
    return x, ws, as_, bs, bis


def check_group(t, i, outs, ranks, scales, dtype, seed, bias=False):
    x, ws, as_, bs, bis = make(t, i, outs, ranks, dtype, seed, bias)
    ys = lora_linear_group(x, ws, as_, bs, scales, bis)
    leaves = [x, *as_, *bs, *[b for b in bis if b is not None]]
    g = torch.Generator().manual_seed(seed + 1)
    dys = [torch.randn(y.shape, generator=g).to(y.dtype) for y in ys]
    grads = torch.autograd.grad(ys, leaves, dys)
    d64 = [t_.detach().double().requires_grad_() for t_ in leaves]
    x64, rest = d64[0], d64[1:]
    a64, b64 = rest[: len(outs)], rest[len(outs): 2 * len(outs)]
    bias64 = rest[2 * len(outs):] if bias else [None] * len(outs)
    refs = [lora_linear_reference(x64, w.double(), a, b, s, bb) for w, a, b, s, bb in zip(ws, a64, b64, scales, bias64)]
    ref_grads = torch.autograd.grad(refs, d64, [d.double() for d in dys])
    for y, r in zip(ys, refs):
        assert torch.isfinite(y).all() and rel(y, r) < TOL[dtype]
    for gr, r in zip(grads, ref_grads):
        assert torch.isfinite(gr).all() and rel(gr, r) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,i,outs,ranks", [(1, 24, [40], [1]), (7, 40, [24, 96], [8, 16]), (33, 96, [40, 40, 24], [16, 64, 8])])
def test_group_against_float64(dtype, t, i, outs, ranks):
    check_group(t, i, outs, ranks, [0.5, 2.0, 1.0][: len(outs)], dtype, seed=t * 7 + i)


def test_bias_and_single():
    check_group(5, 24, [40], [4], [1.5], torch.float32, seed=3, bias=True)
    x, ws, as_, bs, _ = make(4, 24, [40], [4], torch.float32, seed=9)
    torch.testing.assert_close(lora_linear(x, ws[0], as_[0], bs[0], 2.0), lora_linear_reference(x, ws[0], as_[0], bs[0], 2.0))


def test_merged_plan_gives_the_same_numbers(monkeypatch):
    monkeypatch.setattr(lora_mod, "lora_plan", lambda *a, **k: LoRAPlan("merged", "merged", {}))
    check_group(7, 40, [24, 96], [8, 16], [0.5, 2.0], torch.float32, seed=11)


def test_fp32_adapters_on_a_half_base_match_peft():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 32, bias=False)).half()
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    layer = model.base_model.model[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(6, 48).half().requires_grad_()
    ref = layer(x)
    out = lora_linear(x, layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                      layer.scaling["default"]).to(torch.float16)
    assert rel(out, ref) < 2e-3
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, a, b), dy)
    grads = torch.autograd.grad(out, (x, a, b), dy)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and rel(g, r) < 3e-3


def test_bad_groups_are_refused():
    x, ws, as_, bs, _ = make(3, 24, [40], [4], torch.float32, seed=1)
    with pytest.raises(ValueError, match="one A, B"):
        lora_linear_group(x, ws, as_, [], [1.0])
    with pytest.raises(ValueError, match="do not chain"):
        lora_linear_group(x, ws, [torch.randn(4, 20)], bs, [1.0])
