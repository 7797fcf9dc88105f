"""A hub-kernel layer is captured as the module it replaces: the norms that ``kernels.kernelize``
gave a kernel's forward (an instance ``forward`` and ``_kernel_repo``, as kernelize sets them) are
rewritten by the rmsnorm pass, train as the module's own forward does, and keep their kernel
outside training."""

from types import MethodType

import pytest
import torch
from tiny_models import batch, loss_and_grads, tiny_model, twin
from torch import nn

import sloth_fx

pytestmark = pytest.mark.usefixtures("reference_ops")


class HubRMSNorm(nn.Module):
    """A stand-in for a hub kernel's layer: computes an RMSNorm its own way, and counts its calls."""

    calls = 0

    def forward(self, hidden_states):
        HubRMSNorm.calls += 1
        x = hidden_states.float()
        return (self.weight * (x / x.norm(dim=-1, keepdim=True) * x.shape[-1] ** 0.5)).to(hidden_states.dtype)


def kernelize_norms(model: nn.Module) -> int:
    """What kernelize does to each marked norm (kernels' _replace_forward): the count."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    for norm in norms:
        norm.forward = MethodType(HubRMSNorm.forward, norm)
        norm.__dict__["_kernel_repo"] = "a hub repository"
    return len(norms)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_kernelized_norms_are_rewritten_as_the_norms_they_replace(checkpointing):
    original = tiny_model("llama", lora=True, checkpointing=checkpointing)
    optimized = twin(original)
    assert kernelize_norms(optimized) == 5
    sloth_fx.optimize(optimized)
    HubRMSNorm.calls = 0
    for seed in range(2):
        inputs = batch(s=9 + seed, seed=seed)
        loss_ref, grads_ref = loss_and_grads(original, inputs)
        loss, grads = loss_and_grads(optimized, inputs)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert HubRMSNorm.calls == 0  # in training, the layers' norms ran as sloth_fx's fused op
    assert sloth_fx.report(optimized).count("rmsnorm") == 5
    optimized.eval()
    with torch.no_grad():
        optimized(**batch())
    assert HubRMSNorm.calls == 5  # outside training the kernels run, as the user set them
    assert all("_kernel_repo" in vars(m) and "forward" in vars(m) for m in optimized.modules()
               if type(m).__name__.endswith("RMSNorm"))
