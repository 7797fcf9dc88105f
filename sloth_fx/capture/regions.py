"""Capture: TorchDynamo hands each region's forward to our backend as a torch.fx graph.

transformers v5 has no fx tracer of its own and ``torch.fx.symbolic_trace`` cannot follow its
control flow; Dynamo can. sloth_fx compiles *regions*, not the whole model:

- the decoder layers, grouped by class: Dynamo lifts parameters to graph inputs, so under
  activation checkpointing one capture serves every layer of a class; without it HF hands each
  layer the cache object and Dynamo guards on the layer's entry in it, so each layer is captured
  once;
- the decoder's other parametrised children (the final norm);
- the head and loss: the causal-LM module's forward, with the decoder call made opaque
  (``torch._dynamo.disable``), so the graph after that break is ``lm_head`` + loss; its gate
  prepares each training call first (:mod:`sloth_fx.capture.head_gate`).

The backend runs the passes and returns the rewritten ``GraphModule``, which runs eagerly, so
autograd runs each fused op's own backward. Regions run compiled only when the module is training
and grad is enabled; evaluation, ``torch.no_grad()`` and ``generate()`` take the original eager
forward. Batch and sequence sizes are marked dynamic before the first capture, so new sizes never
recapture; a size of 1 causes one more capture (Dynamo specialises sizes 0 and 1).

Dynamo keeps its state (cache entries, guards, recompile counts, which floats and sizes it saw
change) on code objects, for the whole process, and a class's forward is one code object for every
model of the class (transformers' ``forward_with_checkpointing`` is one for every layer class). So
each region of each ``optimize`` call compiles its own copy of the forward (:mod:`sloth_fx.capture.isolation`):
a second model, a ``deepcopy`` or a reloaded pickle never sees another's captures, its eps and
scales stay the constants they are, and each has its own recompile budget, raised only inside its
own calls. All of sloth_fx's state lives in the gate objects installed as the modules' ``forward``
(picklable, copied with the model; a copy compiles afresh), installed by :mod:`sloth_fx.capture.install`.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sloth_fx.memory.checkpoint import apart_from_the_step, replay_rng_in_checkpoints
from sloth_fx.memory.layer_checkpoint import asks_to_checkpoint, checkpointed_call, flag_lowered
from sloth_fx.capture.hub_layers import hub_kernel_modules, hub_kernels_set_aside
from sloth_fx.kernels.lora_forms import recording_into
from sloth_fx.capture.isolation import isolated
from sloth_fx.capture.unrewritten import breaks_since, graph_breaks, unrewritten_cause, warn_unrewritten
from sloth_fx.rewrite.pass_manager import run_pass, subgraphs
from sloth_fx.report import Capture, RegionReport, Report
from sloth_fx.rewrite.verify import compare, concrete


@dataclass
class _Run:
    """The captures that ran for one call of a gate (several where a graph break splits the forward)."""

    captures: list[int]


_RUNNING: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("sloth_fx_running", default=None)
_LIMITS = [name for name in ("recompile_limit", "accumulated_recompile_limit") if hasattr(torch._dynamo.config, name)]


@dataclass
class Region:
    """Modules whose forwards are captured together (one graph serves them all)."""

    name: str
    modules: list[tuple[str, nn.Module]]
    layers: bool = False  # decoder layers (a training call of one that runs unrewritten warns)


def find_regions(model: nn.Module) -> tuple[list[Region], nn.Module | None, nn.Module | None]:
    """The decoder-layer groups, the decoder's other parametrised children, and the head module.

    Returns ``(regions, decoder, head)``; ``head`` is the causal-LM module whose forward holds the
    lm_head and the loss (``None`` when the model has no output embeddings).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        return [], None, None
    prefix = _prefix_of(model, decoder)
    regions: list[Region] = []
    for name, child in decoder.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            by_class: dict[type, list[tuple[str, nn.Module]]] = {}
            for i, layer in enumerate(child):
                by_class.setdefault(type(layer), []).append((f"{path}.{i}", layer))
            regions += [Region(cls.__name__, mods, layers=True) for cls, mods in by_class.items()]
        elif not isinstance(child, nn.Embedding) and any(True for _ in child.parameters(recurse=False)):
            regions.append(Region(type(child).__name__, [(path, child)]))
    has_head = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
    head = base if has_head else None
    if head is not None:
        regions.append(Region(f"{type(base).__name__} head+loss", [(_prefix_of(model, base).rstrip("."), base)]))
    return regions, decoder, head


class Backend:
    """The Dynamo backend of one region: passes over each captured graph, optional verification.

    Every checkpointed body first gets RNG replay (:mod:`sloth_fx.memory.checkpoint`), so that both the
    rewrite and its verification see the recompute draw the forward's random numbers.
    """

    def __init__(self, passes: Sequence[str], verify: bool, region: RegionReport) -> None:
        self.passes = list(passes)
        self.verify = verify
        self.region = region

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        capture = Capture(nodes=len(gm.graph.nodes), dynamic=any(isinstance(x, torch.SymInt) for x in example_inputs))
        self.region.captures.append(capture)
        replayed = sum(replay_rng_in_checkpoints(g) for _, g in subgraphs(gm))
        if replayed:
            capture.notes.append(f"{replayed} activation checkpoint(s) replay the forward's RNG in the recompute")
        check = self.verify and concrete(example_inputs)
        captured = copy.deepcopy(gm)
        with recording_into(capture.lora_forms):  # the LoRA pass's notes read what the op records there
            return self._rewrite(gm, captured, example_inputs, capture, check)

    def _rewrite(self, gm: fx.GraphModule, captured: fx.GraphModule, example_inputs: Sequence[Any], capture: Capture,
                 check: bool) -> CaptureRunner:
        """Each pass over ``gm`` in turn, verified if ``check``; ``captured`` runs if a pass fails."""
        for name in self.passes:
            before = copy.deepcopy(gm) if check else None
            try:
                log = run_pass(gm, name)
            except Exception as error:  # a pass's defect must not stop training: the graph runs as captured
                capture.logs.clear()
                capture.notes.append(f"a pass failed on this graph ({name}: {type(error).__name__}: {error}); "
                                     "it runs as Dynamo captured it, unrewritten")
                return CaptureRunner(captured, self.region, len(self.region.captures) - 1)
            capture.logs.append(log)
            if before is None or not log.rewrites:
                continue
            with apart_from_the_step():  # a capture happens inside a step, maybe inside a checkpoint
                verdict = compare(gm, before, example_inputs)
            if not verdict.ok:
                capture.dropped.append(f"{name}: {verdict.detail}")
                capture.logs.pop()
                gm = before
        if self.verify:
            capture.verified = "each pass checked on random inputs" if check else "skipped: example inputs were fake"
        return CaptureRunner(gm, self.region, len(self.region.captures) - 1)


class CaptureRunner:
    """Runs one rewritten graph and records, for the report, which module ran it."""

    def __init__(self, gm: fx.GraphModule, region: RegionReport, index: int) -> None:
        self.gm, self.region, self.index = gm, region, index

    def __call__(self, *args: Any) -> Any:
        run = _RUNNING.get()
        if run is not None:
            run.captures.append(self.index)
        with recording_into(self.region.captures[self.index].lora_forms):
            return self.gm(*args)


class RegionRuntime:
    """One region of one ``optimize`` call: its report, its passes and its own compiled entry."""

    def __init__(self, name: str, report: RegionReport, owner: Report, passes: Sequence[str], verify: bool,
                 layers: bool = False) -> None:
        self.name, self.report, self.owner, self.passes, self.verify = name, report, owner, list(passes), verify
        self.warns = layers and bool(self.passes)  # a layer that runs unrewritten warns, once per region
        self._entry: Callable[..., Any] | None = None
        self._backend: Backend | None = None

    def compile(self, module: nn.Module) -> Callable[..., Any]:
        """``module``'s training forward through the region's private copy of the forward and its one
        backend (made at first use, and afresh after a copy): one capture can serve every module."""
        if self._entry is None:
            self._entry = isolated(type(module).forward, self.name)
            self._backend = Backend(self.passes, self.verify, self.report)
        return torch.compile(self._entry.__get__(module), backend=self._backend)

    def dynamo_config(self) -> dict[str, Any]:
        """Dynamo's settings while the region runs: room for every module's captures (one per layer
        without checkpointing, sizes of 1 twice that), and no DDPOptimizer. Inside a DDP forward
        Dynamo would split the region's graph at DDP's bucket boundaries (the first bucket holds
        1 MiB: a real layer's adapters split it), cutting patterns apart. The split buys compiled
        graphs an overlap of all-reduce with backward, which a rewritten graph has anyway: it runs
        eagerly, so DDP's hooks fire as each gradient is made. Dynamo's own failures run the frame
        eagerly (``suppress_errors``): the layer trains as it was, and warns
        (:mod:`sloth_fx.capture.unrewritten`)."""
        return {**{name: 4 * len(self.report.modules) + 8 for name in _LIMITS}, "optimize_ddp": False,
                "suppress_errors": True}

    def ran(self, path: str, captures: list[int], breaks: list[str]) -> None:
        """Record that ``path`` ran ``captures``; the first layer of the region to run unrewritten warns."""
        cause = unrewritten_cause([self.report.captures[i] for i in captures], breaks)
        self.report.ran(path, captures, cause if not captures else None)
        if cause is not None and self.warns:
            self.warns = False
            warn_unrewritten(path, self.name, len(self.report.modules), cause)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_entry": None, "_backend": None}


class RegionGate:
    """Installed as a module's ``forward``: the training forward runs through the region's capture,
    under sloth_fx's own checkpoint where the module asks to checkpoint
    (:mod:`sloth_fx.memory.layer_checkpoint`), with hub kernels set in it before its first training
    call seen as the modules they replace (:mod:`sloth_fx.capture.hub_layers`)."""

    def __init__(self, module: nn.Module, path: str, runtime: RegionRuntime, hub_forward: Any = None,
                 apart: nn.Module | None = None) -> None:
        self.module, self.path, self.runtime = module, path, runtime
        self.hub_forward = hub_forward  # the module's own hub kernel, its forward outside training
        self.apart = apart  # a part of the module that is captured on its own (the head's decoder)
        self._compiled: Callable[..., Any] | None = None
        self._hub_candidates: list[nn.Module] = []  # where a hub kernel may sit (read at the first call)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.eager)

    @property
    def eager(self) -> Callable[..., Any]:
        return self.hub_forward or type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not (self.module.training and torch.is_grad_enabled()):
            return self.eager(*args, **kwargs)
        if asks_to_checkpoint(self.module):
            return checkpointed_call(self.module, self.run, args, kwargs)
        return self.run(args, kwargs)

    def run(self, args: tuple, kwargs: dict) -> Any:
        """The training forward, through the region's capture; records who ran what."""
        mark_batch_and_sequence_dynamic(args, kwargs)
        if self._compiled is None:
            self._compiled = self.runtime.compile(self.module)
            self._hub_candidates = hub_kernel_modules(self.module, self.apart)
        run = _Run([])
        token = _RUNNING.set(run)
        breaks = graph_breaks()
        try:
            with torch._dynamo.config.patch(self.runtime.dynamo_config()), flag_lowered(self.module), \
                    hub_kernels_set_aside(self._hub_candidates):
                out = self._compiled(*args, **kwargs)
        finally:
            _RUNNING.reset(token)
        self.runtime.ran(self.path, run.captures, breaks_since(breaks))
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": None, "_hub_candidates": []}


def mark_batch_and_sequence_dynamic(args: tuple, kwargs: dict) -> None:
    """Capture batch and sequence sizes as symbols from the first call, so that a new size never
    recaptures (only a size of 1 does, once: Dynamo specialises 0 and 1)."""
    for value in (*args, *kwargs.values()):
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)


def _prefix_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    return ""
