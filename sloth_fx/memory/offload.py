"""Offloaded activation checkpointing: checkpointed layers' saved inputs wait in host memory.

Under non-reentrant checkpointing (:func:`sloth_fx.memory.checkpoint.checkpoint_body`) a layer keeps only
its inputs for the recompute. torch saves them as saved tensors when the checkpoint starts, before
it pushes its own ``saved_tensors_hooks`` for the body, so a hook pair around the checkpoint call
sees exactly those inputs and nothing the body saves. An :class:`OffloadStep` (one training
forward) is that pair:

- **what moves**: each saved input that is not a parameter (the model holds those anyway) and is a
  contiguous tensor owning its whole storage (moving a view would free nothing, and an expanded
  mask would grow): the hidden state a layer receives. A tensor several layers save (rotary cos and
  sin, a mask) is one :class:`SavedInput` for all of them, and stays where it is while the next
  layer saves it too. Tensors the model holds without registering them as parameters (a 4-bit
  weight's quantization statistics, lifted to inputs by Dynamo) are small and move too, freeing
  nothing.
- **when it leaves**: when the next checkpointed layer starts, that is as soon as the forward has
  passed it. The last layer's inputs never leave: its backward comes first.
- **where to**: host memory. For a CUDA tensor the host buffer is pinned (from PyTorch's caching
  host allocator) and the copy runs on a side stream after the work queued so far on the current
  stream, with an event recorded at its end; the current stream never waits for it, and the
  device tensor's memory is handed out again only once the copy has read it (``record_stream``).
- **when it comes back**: when backward unpacks layer k's inputs (its recompute starts), layer
  k-1's moved inputs are copied back on a second side stream, after their offload event, so they
  arrive while layer k recomputes and runs its backward. Layer k takes the copies prefetched for
  it (the current stream waits on their event, on the device, not the host), or copies now on the
  current stream when none were (another order, a second backward).
- **how many device copies live**: the step holds the copies of at most one prefetched layer; the
  copies it hands to a recompute belong to autograd and go with that layer's backward. With the
  last layer's inputs, at most three layers' inputs are on the device during backward.

Where the checkpoint runs: inside a captured layer graph (transformers' ``forward_with_checkpointing``),
through :func:`sloth_fx.memory.checkpoint.checkpoint_body`; in older transformers, whose layers checkpoint in
``__call__`` around the captured ``forward``, through :class:`sloth_fx.memory.checkpoint.EagerCheckpoint`.

torch's own ``save_on_cpu`` is the same hook pair in its simplest form: it copies each tensor at
save time on the current stream and copies it back only when backward asks. Here the copy waits
until the forward has passed the layer, runs beside the compute, and comes back a layer ahead.

On CPU the same path copies into plain CPU memory, with no streams or events (how the CPU tests
check what moves, when, and what comes back). A copy is exact and the recompute replays the RNG,
so the loss and the gradients are bit for bit those of checkpointing without offload. A saved
input changed in place while still on the device raises, as autograd's version check would
without the hooks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_ACTIVE: contextvars.ContextVar[OffloadStep | None] = contextvars.ContextVar("sloth_fx_offload", default=None)


class SavedInput:
    """One saved input of the step: on its device until :meth:`offload`, then in host memory."""

    def __init__(self, tensor: torch.Tensor, movable: bool) -> None:
        self.on_device: torch.Tensor | None = tensor
        self.version = tensor._version  # detach() shares the version counter: in-place changes show
        self.host: torch.Tensor | None = None
        self.device = tensor.device
        self.movable = movable
        self.copied: torch.cuda.Event | None = None  # CUDA: passed once the host copy is complete

    def offload(self, stream: torch.cuda.Stream | None) -> None:
        """Copy to host memory (pinned, on ``stream``, for a CUDA tensor) and let the device tensor go."""
        tensor, self.on_device = self.unchanged(), None
        pinned = stream is not None
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # after the ops that made it
        with _on(stream):
            self.host.copy_(tensor, non_blocking=pinned)
        if stream is not None:
            self.copied = stream.record_event()
            tensor.record_stream(stream)  # its memory is reused only once the copy has read it

    def unchanged(self) -> torch.Tensor:
        """The device tensor, as it was saved."""
        if self.on_device._version != self.version:
            raise RuntimeError("a checkpointed layer's input was changed in place after its checkpoint saved it; "
                               "the recompute needs it as it was")
        return self.on_device

    def fetch(self, stream: torch.cuda.Stream | None) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A device copy of the host tensor, made on ``stream`` (the current one when None), and the
        event that marks it ready on a side stream (None when it is ready in stream order)."""
        if self.copied is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(self.copied)
        with _on(stream):
            copy = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)  # a copy on CPU too
            copy.copy_(self.host, non_blocking=self.copied is not None)
            return copy, (stream.record_event() if stream is not None else None)


@dataclass(eq=False)
class _Layer:
    """One checkpointed layer's saved inputs, in the order its checkpoint saved them."""

    index: int
    inputs: list[SavedInput] = field(default_factory=list)
    handed: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> tensor, until unpacked


class OffloadStep:
    """One training forward's offloaded checkpoints (the module docstring says what moves when).

    ``log`` lists what moved, in order: ``("offload", k)`` when layer k's inputs left, ``("prefetch",
    k)`` when they were sent back ahead of their recompute, ``("fetch", k)`` when they were copied
    back only as the recompute asked for them.
    """

    def __init__(self) -> None:
        self.layers: list[_Layer] = []
        self.log: list[tuple[str, int]] = []
        self._saved: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> its SavedInput, this step
        self._prefetched: tuple[_Layer, dict[int, tuple[torch.Tensor, torch.cuda.Event | None]]] | None = None
        self._offload_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._prefetch_streams: dict[torch.device, torch.cuda.Stream] = {}

    @contextlib.contextmanager
    def layer(self, args: Sequence[Any]) -> Iterator[None]:
        """Around one checkpoint call on ``args``: the previous layer's inputs leave (those that
        ``args`` holds too stay), and what this checkpoint saves becomes this layer's inputs."""
        staying = {id(saved) for a in args if isinstance(a, torch.Tensor) and (saved := self._saved.get(a)) is not None}
        if self.layers:
            self._offload(self.layers[-1], staying)
        self.layers.append(_Layer(len(self.layers)))
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def moved(self) -> tuple[int, int]:
        """How many layers' inputs went to host memory so far, and their bytes (each tensor once)."""
        layers = sum(1 for what, _ in self.log if what == "offload")
        away = [s.host for s in _unique([s for layer in self.layers for s in layer.inputs]) if s.host is not None]
        return layers, sum(h.numel() * h.element_size() for h in away)

    def _pack(self, tensor: torch.Tensor) -> tuple[_Layer, int]:
        saved = self._saved.get(tensor)
        if saved is None:
            saved = self._saved[tensor] = SavedInput(tensor.detach(), _movable(tensor))
        layer = self.layers[-1]
        layer.inputs.append(saved)
        return layer, len(layer.inputs) - 1

    def _unpack(self, handle: tuple[_Layer, int]) -> torch.Tensor:
        layer, position = handle
        if position not in layer.handed:  # the first of this layer's inputs that its recompute asks for
            layer.handed = self._bring_back(layer)
            if layer.index > 0:
                self._prefetch(self.layers[layer.index - 1])
        return layer.handed.pop(position)

    def _offload(self, layer: _Layer, staying: set[int]) -> None:
        leaving = [s for s in _unique(layer.inputs) if s.movable and s.on_device is not None and id(s) not in staying]
        for saved in leaving:
            saved.offload(_side_stream(self._offload_streams, saved.device))
        if leaving:
            self.log.append(("offload", layer.index))

    def _prefetch(self, layer: _Layer) -> None:
        away = [s for s in _unique(layer.inputs) if s.on_device is None]
        if away:
            self._prefetched = (layer, {id(s): s.fetch(_side_stream(self._prefetch_streams, s.device)) for s in away})
            self.log.append(("prefetch", layer.index))

    def _bring_back(self, layer: _Layer) -> dict[int, torch.Tensor]:
        """Every input of ``layer`` on its device: its own, or the prefetched copies (handed over,
        so that the step no longer holds them), or copies made now."""
        copies: dict[int, torch.Tensor] = {}
        if self._prefetched is not None and self._prefetched[0] is layer:
            copies = {key: _ready(copy, event) for key, (copy, event) in self._prefetched[1].items()}
            self._prefetched = None
        late = [s for s in _unique(layer.inputs) if s.on_device is None and id(s) not in copies]
        for saved in late:
            copies[id(saved)] = saved.fetch(None)[0]
        if late:
            self.log.append(("fetch", layer.index))
        return {i: s.unchanged() if s.on_device is not None else copies[id(s)] for i, s in enumerate(layer.inputs)}


@contextlib.contextmanager
def offloading(on: bool) -> Iterator[OffloadStep | None]:
    """Around one training forward: with ``on``, a fresh :class:`OffloadStep` that the checkpointed
    layers run inside join; without, none (so a model called inside this one joins no outer step)."""
    step = OffloadStep() if on else None
    token = _ACTIVE.set(step)
    try:
        yield step
    finally:
        _ACTIVE.reset(token)


def offloaded_inputs(args: Sequence[Any]) -> contextlib.AbstractContextManager[None]:
    """Around one checkpoint call on ``args``: its saved inputs go through the active step, if any."""
    step = _ACTIVE.get()
    return step.layer(args) if step is not None else contextlib.nullcontext()


def _movable(tensor: torch.Tensor) -> bool:
    """Moving it frees its memory and copies no more than it holds."""
    return (not isinstance(tensor, nn.Parameter) and tensor.layout == torch.strided and tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())


def _unique(inputs: list[SavedInput]) -> list[SavedInput]:
    return list(dict.fromkeys(inputs))


def _side_stream(streams: dict[torch.device, torch.cuda.Stream], device: torch.device) -> torch.cuda.Stream | None:
    """The step's side stream of this kind on a CUDA ``device``; None elsewhere (copies run in order)."""
    if device.type != "cuda":
        return None
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _on(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager[Any]:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _ready(copy: torch.Tensor, event: torch.cuda.Event | None) -> torch.Tensor:
    """A prefetched copy, usable on the current stream: it waits for the copy's event (on the
    device), and the copy's memory, taken on the prefetch stream, is reused only once this stream is
    done with it."""
    if event is not None:
        current = torch.cuda.current_stream(copy.device)
        current.wait_event(event)
        copy.record_stream(current)
    return copy
