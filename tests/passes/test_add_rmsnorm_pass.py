"""The residual add + RMSNorm pass on tiny models: the loss and gradients of the original (and, bit
for bit, of the model with the norms rewritten alone), one site per layer that takes over
rmsnorm's, and look-alikes refused by name."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, loss_and_grads, tiny_model, twin
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import sloth_fx
from sloth_fx.rewrite.pass_manager import get_pass, run_pass

LAYERS = 3


def assert_fusion_changes_no_number(original: nn.Module, passes: list[str], device: str = "cpu") -> nn.Module:
    """``passes`` with add_rmsnorm after them against ``passes`` alone: the same loss and every
    gradient bit for bit. The fused model."""
    inputs = {k: v.to(device) for k, v in batch().items()}
    unfused = sloth_fx.optimize(twin(original), passes=passes)
    fused = sloth_fx.optimize(twin(original), passes=[*passes, "add_rmsnorm"])
    loss, grads = loss_and_grads(fused, inputs)
    loss_unfused, grads_unfused = loss_and_grads(unfused, inputs)
    assert torch.equal(loss, loss_unfused)
    assert grads.keys() == grads_unfused.keys()
    assert all(torch.equal(grads[name], grads_unfused[name]) for name in grads_unfused)
    return fused


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients(family, lora, checkpointing):
    original = tiny_model(family, lora=lora, checkpointing=checkpointing, layers=LAYERS)
    fused = assert_fusion_changes_no_number(original, ["rmsnorm"])
    assert_same_training_step(original, fused, batch())
    report = sloth_fx.report(fused)
    sites = report.sites("add_rmsnorm")
    assert len(sites) == LAYERS and all(site.endswith("post_attention_layernorm") for site in sites)
    # the post-attention norms now run inside add_rmsnorm: rmsnorm counts the input norms and the final one
    assert report.count("rmsnorm") == LAYERS + 1
    text = sloth_fx.explain(fused)
    assert "add_rmsnorm: rewrote post_attention_layernorm  (the residual add fused into rmsnorm's op" in text
    assert f"rewrite sites running in the model: add_rmsnorm {LAYERS}, rmsnorm {LAYERS + 1}" in text


def test_with_every_pass_and_gemma_norm():
    """After all the default passes (LoRA's fused linears feed the add), and over Gemma's (1 + w)
    norm, which the one pattern covers through rmsnorm's op."""
    for family in ("llama", "gemma"):
        original = tiny_model(family, lora=True, checkpointing=True)
        fused = assert_fusion_changes_no_number(original, sloth_fx.available_passes())
        assert_same_training_step(original, fused, batch())
        assert sloth_fx.report(fused).count("add_rmsnorm") == 2


@pytest.mark.gpu
def test_bf16_on_gpu():
    """The Triton kernels at bf16, after every default pass: still bit for bit the unfused run."""
    original = tiny_model("llama", lora=True, checkpointing=True, dtype=torch.bfloat16).cuda()
    fused = assert_fusion_changes_no_number(original, sloth_fx.available_passes(), device="cuda")
    assert sloth_fx.report(fused).count("add_rmsnorm") == 2


def test_verify_keeps_it():
    model = sloth_fx.optimize(tiny_model("llama", lora=True), passes=["rmsnorm", "add_rmsnorm"], verify=True)
    loss_and_grads(model, batch())
    assert sloth_fx.report(model).count("add_rmsnorm") == 2
    assert "dropped by verify" not in sloth_fx.explain(model)


def test_nothing_to_match_without_the_rmsnorm_pass():
    """The pattern is written over rmsnorm's op: run alone, or before rmsnorm, it finds nothing."""
    original = tiny_model("llama")
    for passes in (["add_rmsnorm"], ["add_rmsnorm", "rmsnorm"]):
        model = sloth_fx.optimize(twin(original), passes=passes)
        assert_same_training_step(original, model, batch())
        assert sloth_fx.report(model).count("add_rmsnorm") == 0


class NormOfSum(nn.Module):
    """``norm(x + other)``: the residual add's shape, with an ``other`` that is not a residual."""

    def __init__(self, other: torch.Tensor):
        super().__init__()
        self.norm = LlamaRMSNorm(64)
        self.other = other

    def forward(self, x):
        return self.norm(x + self.other)


@pytest.mark.parametrize("other,reason", [
    (torch.randn(64), "residual shape (2, 5, 64) is not x's (64,): the add would broadcast"),
    (torch.randn(2, 5, 64, dtype=torch.bfloat16), "adds torch.float32 to torch.bfloat16: the sum would be promoted"),
], ids=["bias", "mixed_dtypes"])
def test_look_alikes_are_refused_with_their_reason(other, reason):
    logs = []

    def backend(gm, example_inputs):
        logs.extend(run_pass(gm, name) for name in ("rmsnorm", "add_rmsnorm"))
        return gm

    module = NormOfSum(other)
    x = torch.randn(2, 5, 64)
    out = torch.compile(module, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, module(x), rtol=1e-6, atol=1e-6)
    norms, fusions = logs
    assert len(norms.rewrites) == 1 and not fusions.rewrites
    assert [refusal.reason for refusal in fusions.refusals] == [f"residual_rmsnorm: {reason}"]


def test_opt_in_by_name():
    """Found by name, yet never a default pass, also once its module is loaded."""
    assert get_pass("add_rmsnorm") is not None
    assert "add_rmsnorm" not in sloth_fx.available_passes()
