"""Activation checkpoints in a captured graph that replay the forward's random numbers.

Dynamo captures ``torch.utils.checkpoint.checkpoint(body, *args)`` as the higher-order op
``tag_activation_checkpoint(body_graph, *args, **checkpoint_kwargs)``. Run eagerly, that op forces
``preserve_rng_state=False`` (it expects Inductor to functionalise the RNG, which an eager run never
does): the recompute in backward would draw new dropout masks and the gradients would belong to
another forward than the one that made the loss. :func:`replay_rng_in_checkpoints` points every such
node at :func:`checkpoint_body` instead, which is plain non-reentrant checkpointing with the RNG
state (CPU and every CUDA device of the inputs) stashed at the forward and restored for the
recompute, as ``torch.utils.checkpoint`` does for an eager HF model. A selective-checkpoint policy
that the user gave (``context_fn``, which Dynamo keeps on the body graph's ``meta``) is kept. In a
step that offloads (:mod:`sloth_fx.offload`), the inputs the checkpoint saves wait in host memory.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

from sloth_fx.offload import offloaded_inputs

_HOP = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
# set by the checkpoint call itself, never forwarded from the captured kwargs
_OWN_KWARGS = ("use_reentrant", "preserve_rng_state", "context_fn")


def checkpoint_body(body: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """``body(*args)`` under non-reentrant activation checkpointing that replays the RNG; its saved
    inputs are offloaded when the current step offloads."""
    kept = {k: v for k, v in kwargs.items() if k not in _OWN_KWARGS}
    context_fn = body.meta.get("_checkpoint_context_fn")
    if context_fn is not None:
        kept["context_fn"] = context_fn
    with offloaded_inputs(args):
        return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=True, **kept)


def replay_rng_in_checkpoints(gm: fx.GraphModule) -> int:
    """Point every ``tag_activation_checkpoint`` node of ``gm`` at :func:`checkpoint_body`; the count."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and _HOP is not None and n.target is _HOP]
    for node in nodes:
        node.target = checkpoint_body
    if nodes:
        gm.recompile()
    return len(nodes)
