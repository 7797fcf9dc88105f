"""Installing sloth_fx on a model: each region's modules get a gate as their ``forward``, and
``uninstall`` puts back exactly what was there (someone else's instance-level forward included)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from sloth_fx.capture.regions import RegionGate, RegionRuntime, find_regions
from sloth_fx.capture.head_gate import HeadGate, OpaqueDecoder
from sloth_fx.capture.hub_layers import is_hub_kernel
from sloth_fx.capture.routed_experts import ExpertsRecord, FusedExperts, routed_experts
from sloth_fx.batching.packed_attention import install_packed_attention, uninstall_packed_attention
from sloth_fx.report import RegionReport, Report


@dataclass
class Installation:
    """What ``install`` changed on a model, so that ``uninstall`` restores exactly that."""

    report: Report
    replaced: list[tuple[nn.Module, Any, Any]]  # (module, its instance-level forward before or None, ours)
    packed_attention: nn.Module | None = None  # the model switched to packed attention

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (deepcopy, pickle) compiles afresh: what the original captured does not run in it
        self.__dict__.update(state)
        for region in self.report.regions.values():
            region.forget()


def install(model: nn.Module, passes: Sequence[str], verify: bool, padding_free: bool,
            memory_budget: int | None = None) -> Installation:
    """Route every region's training forward through Dynamo and the sloth_fx backend; with
    ``padding_free``, switch the model to packed attention and pack padded batches; judge each
    training step's checkpointed layers (keep, recompute, offload) against ``memory_budget`` (None:
    what the device can still hand out)."""
    report = Report()
    installation = Installation(report, [])
    regions, decoder, head = find_regions(model)
    if not regions:
        report.notes.append(f"{type(model).__name__} has no decoder with layers to capture; nothing to rewrite")
        return installation
    if padding_free and head is not None:
        refused = install_packed_attention(model)
        if refused is None:
            installation.packed_attention = model
        else:
            report.notes.append(f"padding-free off: {refused}")
    for region in regions:
        foreign = {path: _name(module.__dict__["forward"]) for path, module in region.modules
                   if "forward" in module.__dict__ and not is_hub_kernel(module)}
        report.notes += [f"{path}: its forward was replaced by {name} before optimize; left as it is, unrewritten"
                         + _what_replaced(name) for path, name in foreign.items()]
        modules = [(path, module) for path, module in region.modules if path not in foreign]
        if not modules:
            continue
        region_report = RegionReport(region.name, [path for path, _ in modules])
        report.regions[region.name] = region_report
        runtime = RegionRuntime(region.name, region_report, report, passes, verify, region.layers)
        experts = ExpertsRecord(region.name, [])
        for path, module in modules:
            hub_forward = module.__dict__.get("forward")  # a hub kernel's (foreign ones are left out above)
            gate = (HeadGate(module, path, runtime, installation.packed_attention is not None, hub_forward, decoder)
                    if module is head else RegionGate(module, path, runtime, hub_forward))
            _replace_forward(installation, module, gate)
            for inner, stacked in routed_experts(module) if region.layers else ():
                if inner not in experts.paths:
                    experts.paths.append(inner)
                _replace_forward(installation, stacked, FusedExperts(stacked, experts))
        if experts.paths:
            report.experts.append(experts)
    if decoder is not None and any(module is head for module, _, _ in installation.replaced):
        _replace_forward(installation, decoder, OpaqueDecoder(decoder, report, memory_budget))
    return installation


def displaced(installation: Installation) -> list[str]:
    """What replaced a forward that ``install`` put in place (a trainer's own head, say): sloth_fx
    no longer runs there."""
    names = [(module, _name(module.__dict__.get("forward"))) for module, _, ours in installation.replaced
             if module.__dict__.get("forward") is not ours]
    return [f"{type(module).__name__}'s forward was replaced after optimize by {name}; sloth_fx does not run there"
            + _what_replaced(name) for module, name in names]


def uninstall(installation: Installation) -> None:
    """Put back every ``forward`` that ``install`` replaced, as it was."""
    for module, previous, _ in reversed(installation.replaced):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    installation.replaced.clear()
    if installation.packed_attention is not None:
        uninstall_packed_attention(installation.packed_attention)
        installation.packed_attention = None


def _replace_forward(installation: Installation, module: nn.Module, forward: Any) -> None:
    installation.replaced.append((module, module.__dict__.get("forward"), forward))
    module.forward = forward


def _what_replaced(name: str) -> str:
    """What it means where a trainer's own head took the causal-LM forward, and what to do."""
    if "add_fused_lm_head" not in name:
        return ""
    return (" (TRL's chunked head: it computes the loss and TRL's per-token metrics without building the "
            "logits, so sloth_fx's fused cross-entropy does not run, nor does its packing of padded batches "
            "(TRL's padding_free=True packs them); the decoder layers' rewrites do, and the memory budget. "
            "TRL 1.x installs it in SFTTrainer and DPOTrainer with no setting to turn it off: for sloth_fx's "
            "fused loss, train with transformers.Trainer or a loop of your own)")


def _name(forward: Any) -> str:
    """Who wrote ``forward``: its code's own name (``functools.wraps`` would lend it the class's)."""
    fn = getattr(forward, "func", getattr(forward, "__func__", forward))  # functools.partial, bound method
    code = getattr(fn, "__code__", None)
    if code is not None:
        return getattr(code, "co_qualname", code.co_name)
    return type(fn).__qualname__
