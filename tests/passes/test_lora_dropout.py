"""PEFT LoRA with lora_dropout > 0, fused: the dropout stays in the graph and the fused op reads its
output as the adapters' input, so an optimized model draws PEFT's masks and trains exactly like it."""

import pytest
import torch
from tiny_models import batch, loss_and_grads, tiny_model, twin

import sloth_fx

pytestmark = pytest.mark.usefixtures("reference_ops")


def seeded_step(model, inputs, seed):
    torch.manual_seed(seed)
    return loss_and_grads(model, inputs)


@pytest.mark.parametrize("family,checkpointing,count", [("llama", False, 14), ("llama", True, 14), ("phi", False, 6)])
def test_lora_dropout_trains_exactly_like_peft(family, checkpointing, count):
    """Phi's q, k, v have a bias (the pattern with bias); Llama's seven projections none."""
    original = tiny_model(family, lora=True, lora_dropout=0.1, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    for seed in (7, 8):  # two steps, two sets of masks
        loss_ref, grads_ref = seeded_step(original, batch(), seed)
        loss, grads = seeded_step(optimized, batch(), seed)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
        assert grads.keys() == grads_ref.keys() and len(grads) == 2 * count
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    report = sloth_fx.report(optimized)
    assert report.count("lora") == count and not report.refusals("lora")
    assert "lora_dropout p=0.1 kept in the graph" in sloth_fx.explain(optimized)
    # the masks are really drawn: another seed gives another loss
    assert not torch.equal(seeded_step(optimized, batch(), 8)[0], seeded_step(optimized, batch(), 7)[0])

