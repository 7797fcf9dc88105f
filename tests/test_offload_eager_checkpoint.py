"""Offload where the layers checkpoint eagerly in ``__call__`` (transformers before the
``forward_with_checkpointing`` wrapper, e.g. 5.17 on the GPU machine), around the captured forward.

There no checkpoint lies inside a captured graph, so ``checkpoint_body`` never runs; the layer's
own ``_gradient_checkpointing_func`` must join the step instead (``EagerCheckpoint``). The layer
base below is that version's ``GradientCheckpointingLayer`` reduced to what matters here.
"""

from functools import partial

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sloth_fx.memory import checkpoint as sloth_checkpoint
from sloth_fx.memory import offload


class GradientCheckpointingLayer(nn.Module):
    """transformers 5.17's layer base: ``__call__`` checkpoints ``nn.Module.__call__`` in training."""

    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training:
            return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)
        return super().__call__(*args, **kwargs)


class DropoutLayer(GradientCheckpointingLayer):
    def __init__(self, hidden: int, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden**0.5)

    def forward(self, x, scale=1.0):
        return nn.functional.dropout(torch.tanh(x @ self.weight), p=0.2, training=True) * scale + x


class PlainLayer(DropoutLayer):
    """A layer of the newer transformers: nothing overrides ``__call__``."""

    __call__ = nn.Module.__call__


class Decoder(nn.Module):
    """Its layers in an ``nn.ModuleList``, as a HF decoder holds them."""

    def __init__(self, layers) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def __iter__(self):
        return iter(self.layers)


def decoder(layer_class: type, layers: int = 5, hidden: int = 8, use_reentrant: bool = False) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = Decoder(layer_class(hidden, gen) for _ in range(layers))
    for layer in model:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=use_reentrant)
    return model.train()


def loss_and_grads(model: nn.Module, offloaded: bool, keep: bool = False):
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    torch.manual_seed(5)
    with sloth_checkpoint.keeping_activations(keep), offload.offloading(offloaded) as step:
        h = x
        for layer in model:
            h = layer(h, scale=0.5)
    loss = h.square().sum()
    model.zero_grad(set_to_none=True)
    loss.backward()  # reentrant checkpoints refuse autograd.grad
    return loss.detach(), [x.grad, *(p.grad for p in model.parameters())], step


def assert_bitwise_same(run, reference) -> None:
    """Two ``loss_and_grads`` results: the same loss and every gradient, bit for bit."""
    (loss, grads, _), (ref_loss, ref_grads, _) = run, reference
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_eagerly_checkpointed_layers_offload_bit_exactly(use_reentrant):
    model = decoder(DropoutLayer, use_reentrant=use_reentrant)
    plain = loss_and_grads(model, offloaded=False)
    assert plain[2] is None
    assert sloth_checkpoint.join_eager_checkpoints(model) == 5
    assert sloth_checkpoint.join_eager_checkpoints(model) == 5  # once wrapped, not wrapped again
    assert all(type(layer._gradient_checkpointing_func) is sloth_checkpoint.EagerCheckpoint for layer in model)
    assert all(not isinstance(layer._gradient_checkpointing_func.checkpoint_fn, sloth_checkpoint.EagerCheckpoint)
               for layer in model)
    assert_bitwise_same(loss_and_grads(model, offloaded=False), plain)  # joined, no step active: as it was
    moved = loss_and_grads(model, offloaded=True)
    assert_bitwise_same(moved, plain)
    assert moved[2].log == [("offload", k) for k in range(4)] + [("prefetch", k) for k in reversed(range(4))]


def test_layers_that_do_not_checkpoint_in_call_are_left_alone():
    model = decoder(PlainLayer)
    assert sloth_checkpoint.join_eager_checkpoints(model) == 0
    assert all(type(layer._gradient_checkpointing_func) is partial for layer in model)


def test_a_step_that_keeps_its_activations_skips_the_eager_checkpoint():
    model = decoder(DropoutLayer)
    plain = loss_and_grads(model, offloaded=False)
    sloth_checkpoint.join_eager_checkpoints(model)
    calls = []
    for layer in model:
        inner = layer._gradient_checkpointing_func.checkpoint_fn
        layer._gradient_checkpointing_func.checkpoint_fn = lambda *a, _inner=inner, **k: calls.append(1) or _inner(*a, **k)
    kept = loss_and_grads(model, offloaded=False, keep=True)
    assert calls == []
    assert_bitwise_same(kept, plain)
    loss_and_grads(model, offloaded=False)
    assert len(calls) == 5
