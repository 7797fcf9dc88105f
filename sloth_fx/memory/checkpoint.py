"""Activation checkpoints in a captured graph that replay the forward's random numbers.

Dynamo captures ``torch.utils.checkpoint.checkpoint(body, *args)`` as the higher-order op
``tag_activation_checkpoint(body_graph, *args, **checkpoint_kwargs)``. Run eagerly, that op forces
``preserve_rng_state=False`` (it expects Inductor to functionalise the RNG, which an eager run never
does): the recompute in backward would draw new dropout masks and the gradients would belong to
another forward than the one that made the loss. :func:`replay_rng_in_checkpoints` points every such
node at :func:`checkpoint_body` instead, which is plain non-reentrant checkpointing with the RNG
state (CPU and every CUDA device of the inputs) stashed at the forward and restored for the
recompute, as ``torch.utils.checkpoint`` does for an eager HF model. A selective-checkpoint policy
that the user gave (``context_fn``, which Dynamo keeps on the body graph's ``meta``) is kept.

The checkpoint of a decoder layer that sloth_fx captures is sloth_fx's own, around the capture
(:mod:`sloth_fx.memory.layer_checkpoint`), whichever way transformers checkpoints: the layer's graph
then holds no checkpoint. A checkpoint that a model's own forward makes inside a captured graph
still comes here.

Each training step's plan (:mod:`sloth_fx.memory.budget`) applies to both (:func:`step_checkpoint`),
call by call in the order the calls run (:func:`checkpoint_step`): the first calls the budget holds
run as they are, with no checkpoint (autograd keeps what backward needs, nothing is recomputed);
the next are checkpointed *selectively*, keeping their products' outputs for the recompute
(:mod:`sloth_fx.memory.saved_products`); the rest are checkpointed whole. In a step that offloads
(:mod:`sloth_fx.memory.offload`), the inputs a checkpoint saves wait in host memory. The values
are the same in every case (the recompute replays the forward's RNG, so it draws the masks the
forward drew, and a saved output is what the recompute would compute).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from sloth_fx.memory.offload import offloaded_inputs, offloading
from sloth_fx.memory.saved_products import SavedProducts, products_saved
from sloth_fx.memory.token_chunks import chunking_as, current_chunking

_HOP = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
# set by the checkpoint call itself, never forwarded from the captured kwargs
_OWN_KWARGS = ("use_reentrant", "preserve_rng_state", "context_fn")
# A body graph's meta flag: the graph is a whole checkpointed function, so its outputs are what the
# checkpoint's recompute gives back, and nothing of the recompute runs after them.
CHECKPOINT_BODY = "sloth_fx_checkpoint_body"
_CONTEXT_FN = "_checkpoint_context_fn"  # where Dynamo keeps a selective-checkpoint policy on the body


@dataclass
class CheckpointStep:
    """One training forward's plan for its checkpointed calls, in call order: the first
    ``keep_first`` run with no checkpoint (their activations kept), the next ``save_products``
    are checkpointed with their products' outputs saved (:mod:`sloth_fx.memory.saved_products`),
    the rest are checkpointed whole. It counts what the calls did: ``kept``, ``selective`` (with
    ``saved_bytes`` of product outputs) and ``checkpointed`` (whole)."""

    keep_first: int = 0
    save_products: int = 0
    kept: int = 0
    selective: int = 0
    checkpointed: int = 0
    saved_bytes: int = 0

    def next_call(self) -> str:
        """How the next checkpointed call runs (KEPT, SELECTIVE, WHOLE); counts it."""
        calls = self.kept + self.selective + self.checkpointed
        if calls < self.keep_first:
            self.kept += 1
            return KEPT
        if calls < self.keep_first + self.save_products:
            self.selective += 1
            return SELECTIVE
        self.checkpointed += 1
        return WHOLE


KEPT, SELECTIVE, WHOLE = "kept", "selective", "whole"
_STEP: ContextVar[CheckpointStep | None] = ContextVar("sloth_fx_checkpoint_step", default=None)


@contextlib.contextmanager
def checkpoint_step(keep_first: int = 0, save_products: int = 0) -> Iterator[CheckpointStep]:
    """Around one training forward: its first ``keep_first`` checkpointed calls run without
    checkpointing, the next ``save_products`` save their products' outputs for the recompute;
    the :class:`CheckpointStep` yielded counts them."""
    token = _STEP.set(CheckpointStep(keep_first, save_products))
    try:
        yield _STEP.get()
    finally:
        _STEP.reset(token)


@contextlib.contextmanager
def apart_from_the_step() -> Iterator[None]:
    """Code run inside a training step that is not part of it (verification's own runs of a graph
    being captured): no decision of the step (keep, offload, chunk, a recompute's skip) applies to
    it, and an enclosing checkpoint's saved-tensor hooks do not take what it saves. (A layer that
    checkpoints around its capture, as in transformers 5.17, is captured inside the checkpoint's
    forward: its hooks took verification's tensors, and verification's own backward then started
    the layer's recompute, which stopped it.)"""
    with checkpoint_step(), offloading(False), chunking_as(None), products_saved(None, replay=False), \
            torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
        yield


def _as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def step_checkpoint(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any] | None = None,
                    options: dict[str, Any] | None = None) -> Any:
    """``fn(*args, **kwargs)`` under non-reentrant activation checkpointing that replays the RNG
    (``options``: more of ``torch.utils.checkpoint.checkpoint``'s keywords, a ``context_fn``), as the
    step planned this call: with no checkpoint (kept), checkpointed with its products' outputs
    saved for the recompute (selective), or checkpointed whole; its saved inputs are offloaded
    when the step offloads."""
    kwargs = kwargs or {}
    step = _STEP.get()
    how = WHOLE if step is None else step.next_call()
    if how == KEPT:
        return fn(*args, **kwargs)
    saved = SavedProducts() if how == SELECTIVE else None
    with offloaded_inputs(args):
        out = checkpoint(recomputed_as_forward(fn, saved), *args, use_reentrant=False, preserve_rng_state=True,
                         **(options or {}), **kwargs)
    if saved is not None:
        step.saved_bytes += saved.nbytes
    return out


def checkpoint_body(body: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """A checkpoint that lies in a captured graph: ``body(*args)`` through :func:`step_checkpoint`,
    with the checkpoint's captured keywords and the body's selective-checkpoint policy."""
    options = {k: v for k, v in kwargs.items() if k not in _OWN_KWARGS}
    context_fn = body.meta.get(_CONTEXT_FN)
    if context_fn is not None:
        options["context_fn"] = context_fn
    return step_checkpoint(body, args, options=options)


def recomputed_as_forward(fn: Callable[..., Any], saved: SavedProducts | None = None) -> Callable[..., Any]:
    """``fn`` run in the step state of the forward that checkpoints it (whether token-wise calls
    chunk: :func:`~sloth_fx.memory.token_chunks.chunking_as`) whenever it runs: its recompute, in backward
    after that forward's state has ended, then saves what the forward saved. Every run after the
    first is a recompute, and runs as one (:func:`~sloth_fx.memory.token_chunks.recomputing`).
    With ``saved``, the first run saves its products' outputs there and the recompute takes them
    back (:mod:`sloth_fx.memory.saved_products`)."""
    step = current_chunking()
    runs = 0

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal runs
        runs += 1
        with chunking_as(step, recompute=runs > 1), products_saved(saved, replay=runs > 1):
            return fn(*args, **kwargs)

    return run


def recompute_replays_whole(gm: fx.GraphModule) -> bool:
    """``gm`` is a whole checkpointed function (:data:`CHECKPOINT_BODY`) whose recompute runs every
    op again: no selective-checkpoint policy, which hands saved outputs back by the order of the
    ops and would lose count if the recompute left a call out. A call in it whose output only
    reaches the graph's output through sums may then be left out of the recompute."""
    return bool(gm.meta.get(CHECKPOINT_BODY)) and gm.meta.get(_CONTEXT_FN) is None


def replay_rng_in_checkpoints(gm: fx.GraphModule) -> int:
    """Point every ``tag_activation_checkpoint`` node of ``gm`` at :func:`checkpoint_body`, and flag
    its body graph's ``meta`` with :data:`CHECKPOINT_BODY`; the count."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and _HOP is not None and n.target is _HOP]
    for node in nodes:
        node.target = checkpoint_body
        body = node.args[0]
        if isinstance(body, fx.Node) and body.op == "get_attr":
            getattr(gm, body.target).meta[CHECKPOINT_BODY] = True
    if nodes:
        gm.recompile()
    return len(nodes)
