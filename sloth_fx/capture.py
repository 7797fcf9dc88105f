"""Capture: TorchDynamo hands each region's forward to our backend as a torch.fx graph.

transformers v5 has no fx tracer of its own and ``torch.fx.symbolic_trace`` cannot follow its
control flow; Dynamo can. sloth_fx compiles *regions*, not the whole model:

- the decoder layers, grouped by class: layers share one code object, and since Dynamo lifts
  parameters to graph inputs, under activation checkpointing one capture serves all 32 layers of
  a 7B model; without it HF hands each layer the cache object and Dynamo guards on the layer's
  entry in it, so each layer is captured once;
- the decoder's other parametrised children (the final norm);
- the head and loss: the causal-LM module's forward, with the decoder call made opaque
  (``torch._dynamo.disable``), so the graph after that break is ``lm_head`` + loss.

The backend runs the passes and returns the rewritten ``GraphModule`` itself, which runs eagerly,
so autograd runs each fused op's own backward. Regions run compiled only when the module is
training and grad is enabled; evaluation, ``torch.no_grad()`` and ``generate()`` take the original
eager forward, untouched. Shapes: Dynamo captures static shapes first and, when a size changes,
Shapes: batch and sequence sizes are marked dynamic before the first capture, so new sizes never
recapture; a size of 1 causes one more capture (Dynamo specialises sizes 0 and 1), and the first
decoder layer, whose input does not require grad under LoRA, gets a graph of its own
(tests/test_optimize.py shows the bound).
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from sloth_fx.pass_manager import run_pass
from sloth_fx.report import Capture, RegionReport, Report
from sloth_fx.verify import compare, concrete

_REGION: contextvars.ContextVar[RegionReport | None] = contextvars.ContextVar("sloth_fx_region", default=None)


@dataclass
class Region:
    """Modules whose forwards are captured together (one graph serves them all)."""

    name: str
    modules: list[tuple[str, nn.Module]]


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
            regions += [Region(cls.__name__, mods) for cls, mods in by_class.items()]
        elif not isinstance(child, nn.Embedding) and any(True for _ in child.parameters(recurse=False)):
            regions.append(Region(type(child).__name__, [(path, child)]))
    has_head = hasattr(base, "get_output_embeddings") and base.get_output_embeddings() is not None
    head = base if has_head else None
    if head is not None:
        regions.append(Region(f"{type(base).__name__} head+loss", [(_prefix_of(model, base).rstrip("."), base)]))
    return regions, decoder, head


def install(model: nn.Module, passes: Sequence[str], report: Report, verify: bool) -> None:
    """Route every region's training forward through Dynamo and the sloth_fx backend."""
    regions, decoder, head = find_regions(model)
    if not regions:
        report.notes.append(f"{type(model).__name__} has no decoder with layers to capture; nothing to rewrite")
        return
    backend = Backend(passes, verify)
    _raise_recompile_limit()
    for region in regions:
        region_report = RegionReport(region.name, [path for path, _ in region.modules])
        report.regions[region.name] = region_report
        for _, module in region.modules:
            _gate(module, backend, region_report)
    if head is not None and decoder is not None:
        _make_opaque(decoder)


def _make_opaque(decoder: nn.Module) -> None:
    """Dynamo skips the decoder inside the head region (its layers are regions of their own); the
    graph after it, lm_head + loss, sees the decoder's outputs with dynamic batch and sequence."""
    eager = type(decoder).forward.__get__(decoder)

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = eager(*args, **kwargs)
        _mark_batch_and_sequence_dynamic(tuple(out.values()) if hasattr(out, "values") else (out,), {})
        return out

    decoder.forward = torch._dynamo.disable(forward)


def _raise_recompile_limit(at_least: int = 64) -> None:
    """Every optimized model adds guard sets to the same code objects (all GradientCheckpointingLayer
    subclasses share one forward wrapper), and past Dynamo's limit (8) a frame silently runs
    eagerly, unrewritten; a process that optimizes several models needs more room."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), at_least))
            return


def uninstall(model: nn.Module) -> None:
    """Give every module its own forward back."""
    for module in model.modules():
        if "forward" in module.__dict__:
            del module.forward


def _gate(module: nn.Module, backend: "Backend", region: RegionReport) -> None:
    eager = type(module).forward.__get__(module)
    compiled = torch.compile(eager, backend=backend)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            _mark_batch_and_sequence_dynamic(args, kwargs)
            token = _REGION.set(region)
            try:
                return compiled(*args, **kwargs)
            finally:
                _REGION.reset(token)
        return eager(*args, **kwargs)

    module.forward = forward


def _mark_batch_and_sequence_dynamic(args: tuple, kwargs: dict) -> None:
    """Capture batch and sequence sizes as symbols from the first call, so that a new size never
    recaptures (only a size of 1 does, once: Dynamo specialises 0 and 1)."""
    for value in (*args, *kwargs.values()):
        tensors = value if isinstance(value, (tuple, list)) else (value,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 1)


class Backend:
    """The Dynamo backend: passes over the captured graph, optional verification, eager run."""

    def __init__(self, passes: Sequence[str], verify: bool) -> None:
        self.passes = list(passes)
        self.verify = verify

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        region = _REGION.get()
        capture = Capture(
            nodes=len(gm.graph.nodes),
            dynamic=any(isinstance(x, torch.SymInt) for x in example_inputs),
        )
        if region is not None:
            region.captures.append(capture)
        check = self.verify and concrete(example_inputs)
        for name in self.passes:
            before = copy.deepcopy(gm) if check else None
            log = run_pass(gm, name)
            capture.logs.append(log)
            if before is None or not log.rewrites:
                continue
            verdict = compare(gm, before, example_inputs)
            if not verdict.ok:
                capture.dropped.append(f"{name}: {verdict.detail}")
                capture.logs.pop()
                gm = before
        if self.verify:
            capture.verified = "each pass checked on random inputs" if check else "skipped: example inputs were fake"
        return gm


def _prefix_of(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    return ""
