"""sloth_fx's own activation checkpoint around each decoder layer it captures.

transformers has moved a layer's checkpoint three times in eight releases:

- 5.17 and before: ``GradientCheckpointingLayer.__call__`` checkpoints ``nn.Module.__call__``,
  around the layer's ``forward``;
- 5.24: the class's ``forward`` is wrapped (``forward_with_checkpointing``), so the checkpoint lies
  inside what Dynamo captures;
- 5.25: the same, with hub-kernel attention inside it, whose wrapper sets a context variable:
  Dynamo refuses that side effect inside a checkpoint and captures nothing of the layer.

So sloth_fx takes the checkpoint over for the layers whose forward it gates. transformers still
says which layers checkpoint: ``gradient_checkpointing_enable`` sets ``gradient_checkpointing`` on
each (every n-th with ``every_n_layers``), maybe after ``optimize`` (a trainer does), so the flag is
read at every training call. For a layer that asks to checkpoint (:func:`asks_to_checkpoint`):

- the gate checkpoints the layer's call itself (:func:`checkpointed_call`) through
  :func:`~sloth_fx.memory.checkpoint.step_checkpoint`: non-reentrant, the RNG replayed, as the
  step decided (keep, recompute, offload);
- the flag is down while the captured forward runs (:func:`flag_lowered`), so that no wrapper of
  transformers checkpoints inside it: Dynamo captures the layer's plain computation, whatever
  transformers wraps around it;
- a KV cache is dropped from the call, as transformers does under checkpointing (the recompute
  would write it a second time), unless the layer says that it only reads it
  (``_can_checkpoint_with_cache``);
- where the layer's ``__call__`` checkpoints around ``forward`` (5.17), that checkpoint becomes a
  plain call (:class:`CallThrough`, set by :func:`own_checkpoints` before each training forward),
  so that the layer is checkpointed once, by sloth_fx.

Of the user's checkpoint options, a selective policy (``context_fn``) is kept: it changes what is
saved. ``use_reentrant`` and ``preserve_rng_state`` are not: sloth_fx's checkpoint is non-reentrant
and replays the RNG, and either way the numbers are those of the forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn
from transformers.cache_utils import Cache

from sloth_fx.memory.checkpoint import step_checkpoint

_FLAG = "gradient_checkpointing"
_CHECKPOINT_FN = "_gradient_checkpointing_func"
# torch.utils.checkpoint's own keywords: never passed on to the checkpointed function
_CHECKPOINT_KEYWORDS = ("use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug",
                        "early_stop")


def asks_to_checkpoint(layer: nn.Module) -> bool:
    """transformers set ``layer`` to checkpoint (``gradient_checkpointing_enable``)."""
    return getattr(layer, _FLAG, False) is True and callable(getattr(layer, _CHECKPOINT_FN, None))


def checkpointed_call(layer: nn.Module, run: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
    """``run(args, kwargs)``, the gate's captured call of ``layer``, under sloth_fx's checkpoint."""
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        kwargs = {name: None if isinstance(value, Cache) else value for name, value in kwargs.items()}
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
    return step_checkpoint(lambda *a, **k: run(a, k), args, kwargs, _user_options(layer))


@contextlib.contextmanager
def flag_lowered(layer: nn.Module) -> Iterator[None]:
    """``layer`` does not ask to checkpoint while this lasts (its own checkpoint is sloth_fx's)."""
    state = vars(layer)
    if state.get(_FLAG) is not True:
        yield
        return
    state[_FLAG] = False
    try:
        yield
    finally:
        state[_FLAG] = True


class CallThrough:
    """A layer's ``_gradient_checkpointing_func`` that calls the function: the layer's checkpoint
    is sloth_fx's, around its forward. ``checkpoint_fn`` is the function it stands in for."""

    def __init__(self, checkpoint_fn: Callable[..., Any]) -> None:
        self.checkpoint_fn = checkpoint_fn

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{k: v for k, v in kwargs.items() if k not in _CHECKPOINT_KEYWORDS})


def own_checkpoints(layers: Iterable[nn.Module]) -> int:
    """Make each of ``layers`` (gated ones) that asks to checkpoint leave it to sloth_fx: its
    ``_gradient_checkpointing_func`` becomes a :class:`CallThrough` (again after a trainer enabled
    checkpointing anew). How many layers ask to checkpoint."""
    count = 0
    for layer in layers:
        if not asks_to_checkpoint(layer):
            continue
        count += 1
        checkpoint_fn = getattr(layer, _CHECKPOINT_FN)
        if not isinstance(checkpoint_fn, CallThrough):
            setattr(layer, _CHECKPOINT_FN, CallThrough(checkpoint_fn))
    return count


def _user_options(layer: nn.Module) -> dict[str, Any]:
    """The selective-checkpoint policy the user gave ``gradient_checkpointing_enable``, if any."""
    checkpoint_fn = getattr(layer, _CHECKPOINT_FN)
    checkpoint_fn = getattr(checkpoint_fn, "checkpoint_fn", checkpoint_fn)
    context_fn = getattr(checkpoint_fn, "keywords", {}).get("context_fn")
    return {} if context_fn is None else {"context_fn": context_fn}
