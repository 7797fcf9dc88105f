"""Logit scaling in the fused cross-entropy: ``* m`` (Cohere) and ``/ d`` (Granite) in the model
dtype before the upcast, as HF spells them; the Triton path (interpreted on CPU) against HF's
computation written out with autograd, over one and several chunks."""

import pytest
import torch
import torch.nn.functional as F

from sloth_fx.kernels.cross_entropy import linear_cross_entropy
from sloth_fx.kernels.cross_entropy_reference import LogitScale

# relative errors (loss; gradients by norm) against HF in the same dtype, as for the unscaled op
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-4, 1e-2)}
SCALES = [LogitScale("mul", 0.0625), LogitScale("div", 8.0), LogitScale("div", 3.0)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def hf_loss(hidden, weight, labels, scale, num_items):
    logits = scale(F.linear(hidden, weight)).float()
    if num_items is None:
        return F.cross_entropy(logits, labels, ignore_index=-100)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum") / num_items


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"{s.op}{s.value}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [None, 1], ids=["one_chunk", "row_chunks"])
@pytest.mark.parametrize("num_items", [None, 11])
def test_scaled_logits_match_hf(scale, dtype, budget, num_items, device):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(13, 24, generator=gen).mul(4).to(device, dtype).requires_grad_()
    weight = torch.randn(37, 24, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, 37, (13,), generator=gen).to(device)
    labels[3] = -100
    loss = linear_cross_entropy(hidden, weight, labels, logit_scale=scale, num_items_in_batch=num_items,
                                memory_budget_bytes=budget)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref = hf_loss(hidden, weight, labels, scale, num_items)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    loss_tol, grad_tol = TOL[dtype]
    assert rel_err(loss, ref) <= loss_tol
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) <= grad_tol

def test_bad_scale_raises(device):
    hidden, weight, labels = torch.randn(2, 4, device=device), torch.randn(5, 4, device=device), torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="not finite"):
        linear_cross_entropy(hidden, weight, labels, logit_scale=LogitScale("div", 0.0))
    with pytest.raises(TypeError, match="LogitScale"):
        linear_cross_entropy(hidden, weight, labels, logit_scale=0.5)
