"""sloth_fx's own checkpoint of a gated layer (``sloth_fx.memory.layer_checkpoint``), piece by piece.
End to end: a model whose layers checkpoint in ``__call__`` as 5.17's do
(test_eager_checkpoint_model.py), today's (test_checkpoint_rng.py, test_offload.py), and a layer
that Dynamo could not capture inside transformers' checkpoint (test_unrewritten_layers.py)."""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
from transformers.cache_utils import DynamicCache

from sloth_fx.memory import layer_checkpoint
from sloth_fx.memory.checkpoint import checkpoint_step


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x, past_key_values=None, use_cache=False):
        return torch.tanh(x @ self.weight)


def checkpointing(layer: nn.Module, **options) -> nn.Module:
    layer.gradient_checkpointing = True
    layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=True, **options)
    return layer


def test_only_layers_that_ask_hand_their_checkpoint_over_once():
    asking, plain = checkpointing(Layer()), Layer()
    original = asking._gradient_checkpointing_func
    assert layer_checkpoint.own_checkpoints([asking, plain]) == 1
    assert layer_checkpoint.own_checkpoints([asking, plain]) == 1
    through = asking._gradient_checkpointing_func
    assert isinstance(through, layer_checkpoint.CallThrough) and through.checkpoint_fn is original
    assert "_gradient_checkpointing_func" not in vars(plain)
    seen = []
    assert through(lambda *a, **k: seen.append((a, k)) or 5, 1, use_reentrant=False, scale=2) == 5
    assert seen == [((1,), {"scale": 2})]  # the checkpoint's own keywords stop there


def test_the_flag_is_down_only_while_the_capture_runs():
    layer = checkpointing(Layer())
    with layer_checkpoint.flag_lowered(layer):
        assert layer.gradient_checkpointing is False and not layer_checkpoint.asks_to_checkpoint(layer)
    assert layer.gradient_checkpointing is True and layer_checkpoint.asks_to_checkpoint(layer)
    plain = Layer()
    with layer_checkpoint.flag_lowered(plain):
        assert "gradient_checkpointing" not in vars(plain)


def test_a_checkpointed_call_gets_no_cache_unless_the_layer_only_reads_it():
    layer = checkpointing(Layer())
    seen = []

    def run(args, kwargs):
        seen.append(kwargs)
        return layer.forward(*args, **kwargs)

    x = torch.randn(3, 4, requires_grad=True)
    cache = DynamicCache()
    layer_checkpoint.checkpointed_call(layer, run, (x,), {"past_key_values": cache, "use_cache": True})
    assert seen[-1] == {"past_key_values": None, "use_cache": False}
    layer._can_checkpoint_with_cache = True
    layer_checkpoint.checkpointed_call(layer, run, (x,), {"past_key_values": cache, "use_cache": True})
    assert seen[-1]["past_key_values"] is cache and seen[-1]["use_cache"] is True


def test_the_checkpoint_recomputes_keeps_or_takes_the_users_policy(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr("sloth_fx.memory.checkpoint.checkpoint", counted)
    x = torch.randn(3, 4, requires_grad=True)
    layer = checkpointing(Layer())
    run = lambda args, kwargs: layer.forward(*args, **kwargs)  # noqa: E731
    out = layer_checkpoint.checkpointed_call(layer, run, (x,), {})
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.autograd.grad(layer.forward(x).sum(), x)[0])
    assert calls[-1]["use_reentrant"] is False and calls[-1]["preserve_rng_state"] is True
    with checkpoint_step(keep_first=1) as step:
        layer_checkpoint.checkpointed_call(layer, run, (x,), {})
    assert len(calls) == 1 and (step.kept, step.checkpointed) == (1, 0)
    with checkpoint_step() as step:
        layer_checkpoint.checkpointed_call(layer, run, (x,), {})
    assert len(calls) == 2 and (step.kept, step.checkpointed) == (0, 1)
    policy = partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    selective = checkpointing(Layer(), context_fn=policy)
    layer_checkpoint.checkpointed_call(selective, run, (x,), {})
    assert calls[-1]["context_fn"] is policy
