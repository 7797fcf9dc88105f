"""No silent loss: a decoder layer that trains unrewritten warns once, with its name and the cause,
and trains exactly; and a layer whose forward holds what stopped Dynamo inside transformers 5.25's
checkpoint (a side effect on a Python object) is captured, since the checkpoint is sloth_fx's own."""

import warnings

import pytest
import torch
from tiny_models import batch, loss_and_grads, tiny_model, twin
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

import sloth_fx
from sloth_fx.capture.unrewritten import UnrewrittenLayerWarning
from sloth_fx.rewrite import pass_manager

pytestmark = pytest.mark.usefixtures("reference_ops")


def steps(original, optimized, n: int = 2) -> list[warnings.WarningMessage]:
    """``n`` training steps of both models on ragged batches, from the same random state (for
    dropout), with the same loss and gradients; the sloth_fx warnings they raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(n):
            inputs = batch(b=3, s=7 + 4 * s, seed=s)
            inputs["labels"][1, 5:] = -100
            torch.manual_seed(s)
            loss_ref, grads_ref = loss_and_grads(original, inputs)
            torch.manual_seed(s)
            loss, grads = loss_and_grads(optimized, inputs)
            torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
            assert grads.keys() == grads_ref.keys()
            for name in grads:
                torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    return [w for w in caught if issubclass(w.category, UnrewrittenLayerWarning)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_layer_dynamo_must_skip_warns_once_and_trains_exactly(monkeypatch, checkpointing):
    monkeypatch.setattr(LlamaDecoderLayer, "forward", torch._dynamo.disable(LlamaDecoderLayer.forward))
    original = tiny_model("llama", lora=True, checkpointing=checkpointing, layers=3, lora_dropout=0.1)
    optimized = sloth_fx.optimize(twin(original))
    caught = steps(original, optimized)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "model.model.layers.0, a LlamaDecoderLayer (and likely the other 2 layers of its class)" in message
    assert "TorchDynamo did not capture its forward" in message and "sloth_fx.explain(model)" in message
    text = sloth_fx.explain(optimized)
    assert all(f"layers.{i} runs unrewritten: TorchDynamo did not capture its forward" in text for i in range(3))


def test_a_layer_whose_patterns_are_all_refused_warns_with_the_refusal():
    original = tiny_model("phi", layers=2)  # LayerNorm: the rmsnorm pass finds no RMSNorm there
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    (warning,) = steps(original, optimized)
    assert "PhiDecoderLayer" in str(warning.message)
    assert "no pattern of sloth_fx's passes matched its computation" in str(warning.message)


def test_a_pass_that_fails_leaves_the_capture_as_captured_and_warns(monkeypatch):
    def broken(gm, log):
        raise RuntimeError("a defect in a pass")

    monkeypatch.setitem(pass_manager._REGISTRY, "broken", broken)
    original = tiny_model("llama", lora=True, layers=2)
    optimized = sloth_fx.optimize(twin(original), passes=["broken"])
    (warning,) = steps(original, optimized)
    assert "a pass failed on this graph (broken: RuntimeError: a defect in a pass)" in str(warning.message)
    assert "a pass failed on this graph" in sloth_fx.explain(optimized)


def test_rewritten_layers_do_not_warn():
    original = tiny_model("llama", lora=True, checkpointing=True, layers=2)
    assert steps(original, sloth_fx.optimize(twin(original))) == []


class _Collector:
    """A module-level object that an attention forward writes to, as transformers 5.25's
    hub-kernel wrapper does with its context variable."""

    value = None


@pytest.mark.parametrize("lora", [False, True])
def test_a_side_effect_inside_a_checkpointed_layer_is_still_captured(monkeypatch, lora):
    """Inside a checkpoint Dynamo refuses to mutate a Python object (transformers 5.25's attention
    does); sloth_fx's own checkpoint lies around the capture, so the layer is captured whole."""
    forward = LlamaAttention.forward

    def marking_forward(self, *args, **kwargs):
        _Collector.value = self.layer_idx
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaAttention, "forward", marking_forward)
    original = tiny_model("llama", lora=lora, checkpointing=True, layers=2, lora_dropout=0.1 if lora else 0.0)
    optimized = sloth_fx.optimize(twin(original))
    assert steps(original, optimized) == []
    report = sloth_fx.report(optimized)
    assert report.count("rope") == 4 and report.count("gated_mlp") == 2 and report.count("lora") == (14 if lora else 0)
    assert "runs unrewritten" not in sloth_fx.explain(optimized)
