"""Routed experts: run by the fused op outside the capture, or as transformers runs them.

An MoE decoder layer's routed experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS in
transformers 5) hold every expert's weights stacked in parameters of three dims and loop over the
experts that received tokens: which experts, and how many tokens each, are data. Dynamo cannot
take that loop as one graph: it breaks the graph at its data-dependent steps and specialises on
what it saw, so every training step, routed otherwise, would capture the layer again until the
recompile limit (six steps of a tiny Mixtral with LoRA on its experts: 35 captures, then the limit).

So the experts module runs outside the capture: the outermost one, PEFT's ``ParamWrapper`` where
LoRA is on the experts through ``target_parameters``. Its ``forward`` becomes a
:class:`FusedExperts`, which Dynamo does not enter: the layer's graph breaks once there, and what
comes before (norms, attention, the router) and after is captured once and rewritten.

It reads what the module computes (:mod:`~sloth_fx.capture.experts_form`, the pattern's check: its
layout and activation at the first call, its adapters at each) and runs the fused op, grouped
products over all experts with LoRA folded in (:func:`~sloth_fx.kernels.routed_experts.routed_experts`,
which checks its arguments once per signature and raises what it refuses). Its first fused call is verified
against the module's own forward on the call's first tokens, so a module that carries the flags but
computes otherwise is found out by its numbers. A module refused, by its form or that check, runs
exactly as transformers and PEFT run it, with an :class:`UnfusedExpertsWarning` naming the cause;
explain gives each module's forward calls, fused and not, and the reason.

4-bit stacks (:func:`sloth_fx.quantize_experts`) are found by their quantized shape and fused like
dense ones (the op dequantizes them). The module's own forward cannot read them, so the unfused
calls and the first-call check run it with the dense stacks swapped in
(:func:`~sloth_fx.capture.dense_experts.dense_stacks`): the numbers QLoRA defines.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sloth_fx.capture.dense_experts import dense_stacks
from sloth_fx.capture.experts_form import ExpertsForm, ExpertsLayout, experts_form, experts_layout, peft_wrappers
from sloth_fx.capture.unrewritten import UnrewrittenLayerWarning
from sloth_fx.kernels.routed_experts import routed_experts as fused_routed_experts
from sloth_fx.kernels.toolkit import Unsupported, base_weight_shape
from sloth_fx.memory.saved_products import products_saved
from sloth_fx.memory.token_chunks import recomputing

PROBE_TOKENS = 64  # tokens of the first call the fused op is checked on against the module's own forward
# Largest difference from the module's forward, relative to its output's largest magnitude, that
# the check accepts: rounding of the two orders of summation (PEFT merges W + s·B·A in the weight's
# dtype, the fused op adds the low-rank product in fp32). A different layout is off by O(1).
PROBE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class UnfusedExpertsWarning(UnrewrittenLayerWarning):
    """Routed experts trained as transformers runs them, without the fused op: exact, not faster."""


def stacks_experts(module: nn.Module) -> bool:
    """``module`` holds stacked expert weights (a parameter of three or more dims, a 4-bit one by
    its quantized shape), itself or through the base layers PEFT wraps around it."""
    if any(len(base_weight_shape(p)) >= 3 for p in module.parameters(recurse=False)):
        return True
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and stacks_experts(base)


def routed_experts(layer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The outermost modules of ``layer`` that stack expert weights, with their paths in it."""
    found: list[str] = []
    for path, module in layer.named_modules():
        if any(path == f or path.startswith(f"{f}.") for f in found):
            continue  # inside experts already found (a wrapped base layer)
        if path and stacks_experts(module):
            found.append(path)
            yield path, module


@dataclass
class ExpertsRecord:
    """What one region's routed experts ran, for explain."""

    region: str
    paths: list[str]
    # forward calls only: a checkpoint's recompute (sloth_fx's own) runs the module again, and
    # torch's early stop may end that run inside the op, so counting it would count some of them
    fused: int = 0
    unfused: int = 0
    form: str = ""
    reason: str = ""  # why the latest unfused call was not fused
    warned: set[str] = field(default_factory=set)  # reasons already warned of, once a region

    def line(self) -> str:
        where = f"{self.region}: routed experts {', '.join(self.paths)}"
        if not self.fused and not self.unfused:
            return f"{where}: not run yet"
        fused = f"fused op in {_calls(self.fused)} ({self.form}; grouped products over the experts)" if self.fused else ""
        unfused = f"as transformers runs them in {_calls(self.unfused)}: {self.reason}" if self.unfused else ""
        return f"{where}: " + "; ".join(part for part in (fused, unfused) if part)


def _calls(n: int) -> str:
    return f"{n} forward call" if n == 1 else f"{n} forward calls"


class FusedExperts:
    """The ``forward`` of a routed-experts module: the fused op where the module's form allows,
    else its class's forward; run eagerly (Dynamo breaks the graph at the call)."""

    def __init__(self, module: nn.Module, record: ExpertsRecord) -> None:
        self.module = module
        self.record = record
        self.layout: ExpertsLayout | str | None = None  # read at the first call
        self.verified = False
        # PEFT's wrappers take (x, *args): the call's arguments are named by the experts' own forward
        self.signature = inspect.signature(type(peft_wrappers(module)[1]).forward)

    @torch._dynamo.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        form, call = self._form(args, kwargs)
        if isinstance(form, str):
            return self._unfused(form, args, kwargs)
        try:  # the op checks its arguments first, once per signature, and raises what it refuses
            if not self.verified:
                refused = self._verify(form, *call)
                if refused:
                    return self._unfused(refused, args, kwargs)
                self.verified = True
            out = fused_routed_experts(*call, form.gate_up, form.down, form.activation)
        except Unsupported as refused:
            return self._unfused(refused.reason, args, kwargs)
        self.record.fused += not recomputing()
        self.record.form = form.describe()
        return out

    def _form(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[ExpertsForm | str, tuple[Any, ...]]:
        try:
            bound = self.signature.bind(self.module, *args, **kwargs)
        except TypeError as error:
            return f"called with arguments the fused op does not take ({error})", ()
        call = tuple(list(bound.arguments.values())[1:4])
        if len(call) != 3 or len(bound.arguments) != 4:
            return "called with other than (hidden_states, top_k_index, top_k_weights)", ()
        if self.layout is None:
            self.layout = experts_layout(self.module)
        if isinstance(self.layout, str):
            return self.layout, call
        return experts_form(self.layout), call

    def _verify(self, form: ExpertsForm, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> str:
        """Empty when the fused op matches the module's forward on the first tokens, else why not."""
        n = min(PROBE_TOKENS, hidden.shape[0])
        probe = (hidden[:n].detach(), index[:n], weights[:n].detach())
        # outside any selective recompute's saving: the probe is no product of the layer's forward
        with torch.no_grad(), products_saved(None, replay=False):
            with dense_stacks(self.module):
                expected = type(self.module).forward(self.module, *probe)
            got = fused_routed_experts(*probe, form.gate_up, form.down, form.activation)
        scale = expected.abs().max().item()
        off = (got.float() - expected.float()).abs().max().item()
        tolerance = PROBE_TOLERANCE.get(hidden.dtype, 1e-2)
        if not off <= tolerance * max(scale, 1e-30):  # NaN fails too
            return (f"the fused op's output on the first {n} tokens is off by {off:.3g} from the module's forward "
                    f"(largest output {scale:.3g}, tolerance {tolerance:g} of it): the module computes something "
                    "else than its flags say")
        return ""

    def _unfused(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.record.unfused += not recomputing()
        self.record.reason = reason
        if reason not in self.record.warned:
            self.record.warned.add(reason)
            warnings.warn(f"sloth_fx: routed experts of {self.record.region} run unfused, exactly as without "
                          f"sloth_fx but no faster: {reason}", UnfusedExpertsWarning, stacklevel=2)
        with dense_stacks(self.module):
            return type(self.module).forward(self.module, *args, **kwargs)
