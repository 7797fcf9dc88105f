"""Selective recompute: a checkpointed layer that keeps its products' outputs and recomputes the rest.

A checkpointed layer saves its input and runs its whole forward again in backward. Most of that
second forward is its matrix products (the base weights' GEMMs and the LoRA adapters'), the
dearest part of the layer by far; the rest (norms, rope, the gated activation, attention's
forward) is cheap beside them. A layer recomputed *selectively* keeps the outputs of its fused
LoRA linears from the forward (each group's ``y_i = x·W_iᵀ + s_i·(x·A_iᵀ)·B_iᵀ`` and its ``x·Aᵀ``,
:class:`~sloth_fx.kernels.lora_function.LoRAGroupFunction`) and, in the recompute, takes them
back instead of running the products again; everything else is recomputed from them.

Exactness: the recompute replays the forward's RNG (:mod:`sloth_fx.memory.checkpoint`), so it
computes what the forward computed; handing back the forward's own outputs gives those values
bit for bit, and the backward that follows is the same. A saved output that was written in place
after it was saved (its version moved) is not handed back: the product runs again.

Memory: per token and selectively recomputed layer, the sum of its LoRA linears' output widths in
the compute dtype, plus ``4·Σ r`` bytes of ``x·Aᵀ``; about half of what a layer keeps with no
recompute (:mod:`sloth_fx.memory.budget` counts it from the model).

The outputs are matched by the group's first base weight and the input's shape, in call order:
a recompute that runs fewer products (checkpointing stops the recompute once it has what
backward needs) leaves the rest unread, and they are freed with the layer's checkpoint.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

ProductKey = tuple[int, tuple[int, ...], torch.dtype]


@dataclass
class SavedProducts:
    """One checkpointed call's saved product outputs, by product, in call order."""

    outputs: dict[ProductKey, deque[tuple[tuple[torch.Tensor, int], ...]]] = field(
        default_factory=lambda: defaultdict(deque))
    nbytes: int = 0
    count: int = 0


# (the call's saved products, whether this run replays them) while a selectively checkpointed call runs
_ACTIVE: ContextVar[tuple[SavedProducts, bool] | None] = ContextVar("sloth_fx_saved_products", default=None)


@contextlib.contextmanager
def products_saved(saved: SavedProducts | None, replay: bool) -> Iterator[None]:
    """While this lasts, fused products save their outputs into ``saved`` (the forward) or take them
    back from it (``replay``: the recompute). With ``saved`` None, neither."""
    token = _ACTIVE.set(None if saved is None else (saved, replay))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def product_key(weight: torch.Tensor, x: torch.Tensor) -> ProductKey:
    """Which product a call is: its (first) weight and its input's shape and dtype."""
    return id(weight), tuple(x.shape), x.dtype


def recall(weight: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The outputs the forward saved for the product of ``weight`` (a group's first) on ``x``, in
    the recompute of a selectively checkpointed call; None anywhere else, or when one of them was
    written in place since."""
    active = _ACTIVE.get()
    if active is None or not active[1]:
        return None
    queue = active[0].outputs.get(product_key(weight, x))
    if not queue:
        return None
    entry = queue.popleft()
    if any(t._version != version for t, version in entry):
        return None
    return tuple(t for t, _ in entry)


def remember(weight: torch.Tensor, x: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
    """In the forward of a selectively checkpointed call, save ``outputs`` of the product of
    ``weight`` on ``x`` (aliases, not copies) for its recompute; elsewhere nothing."""
    active = _ACTIVE.get()
    if active is None or active[1]:
        return
    saved = active[0]
    saved.outputs[product_key(weight, x)].append(tuple((t.detach(), t._version) for t in outputs))
    saved.nbytes += sum(t.numel() * t.element_size() for t in outputs)
    saved.count += 1
