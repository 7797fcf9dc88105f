"""A tiny Llama whose layers checkpoint in ``__call__``, around the captured forward, as transformers
5.17 (the GPU machine's) does: optimized with ``verify``, a step that offloads and chunks trains
as the unoptimized model does. There the capture happens inside the checkpoint's forward;
verification runs its own graphs apart from the step (before, the checkpoint's saved-tensor hooks
took their tensors, and verification's backward started the layer's recompute, which stopped it)."""

from functools import partial

import pytest
import torch
from tiny_models import CHECKPOINT_IN_FORWARD, batch, loss_and_grads, tiny_model, twin
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import sloth_fx
from sloth_fx.memory import token_chunks


class GradientCheckpointingLayer(nn.Module):
    """transformers 5.17's layer base, reduced: ``__call__`` checkpoints ``nn.Module.__call__``."""

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(partial(nn.Module.__call__, self, **kwargs), *args)
        return nn.Module.__call__(self, *args, **kwargs)


@pytest.fixture
def layers_checkpoint_in_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama's layer as in 5.17: its own forward (not today's checkpointing wrapper) and that
    ``__call__`` (with 5.17 itself, as it is)."""
    if CHECKPOINT_IN_FORWARD:
        monkeypatch.setattr(LlamaDecoderLayer, "forward", LlamaDecoderLayer.forward.__wrapped__)
        monkeypatch.setattr(LlamaDecoderLayer, "__call__", GradientCheckpointingLayer.__call__)


@pytest.mark.full
def test_verified_offloaded_and_chunked_step_is_exact(layers_checkpoint_in_call, monkeypatch):
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", 16)
    original = tiny_model("llama", lora=True, checkpointing=True, layers=5)
    optimized = sloth_fx.optimize(twin(original), memory_budget=0, verify=True)
    for _ in range(2):  # the first step captures, the second runs what was captured
        loss, grads = loss_and_grads(optimized, batch(s=37))
        loss_ref, grads_ref = loss_and_grads(original, batch(s=37))
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
        assert grads.keys() == grads_ref.keys() and len(grads) == 5 * 14
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    text = sloth_fx.explain(optimized)
    assert "activation checkpointing, offload (latest)" in text and "this forward moved 4 layers' inputs" in text
    assert "this forward ran 5 MLPs over chunks of tokens" in text
    assert "run again in the layer's recompute" in text and "not run again" not in text  # checkpointed around
    assert "dropped by verify" not in text and sloth_fx.report(optimized).count("chunked_mlp") == 5
