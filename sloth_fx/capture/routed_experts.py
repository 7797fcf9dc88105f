"""Routed experts run outside the capture, as transformers runs them (sloth_fx has no fused MoE op yet).

An MoE decoder layer's routed experts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GPT-OSS in
transformers 5) hold every expert's weights stacked in parameters of three dims
(``[experts, out, in]``) and loop over the experts that received tokens: which experts, and how
many tokens each, are data. Dynamo cannot take that loop as one graph: it breaks the graph at its
data-dependent steps and specialises on what it saw, so every training step, routed otherwise,
captures the layer again, until the recompile limit makes Dynamo give up on the frame (six steps
of a tiny Mixtral with LoRA on its experts: 35 captures, then the limit).

So the experts module runs eagerly: the outermost one, PEFT's ``ParamWrapper`` where LoRA is on
the experts through ``target_parameters``. Its ``forward`` becomes an :class:`EagerExperts`,
which Dynamo does not enter: the layer's graph breaks once there, and what comes before (the
norms, attention, the router) and after (the residual) is captured once, with dynamic shapes, and
rewritten. The experts compute exactly what transformers and PEFT compute. explain names them
(:func:`experts_note`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def stacks_experts(module: nn.Module) -> bool:
    """``module`` holds stacked expert weights (a parameter of three or more dims), itself or
    through the base layers PEFT wraps around it."""
    if any(p.dim() >= 3 for p in module.parameters(recurse=False)):
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


class EagerExperts:
    """The ``forward`` of a routed-experts module: its class's forward, run eagerly (Dynamo breaks
    the graph at the call instead of entering it)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @torch._dynamo.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


def experts_note(region: str, paths: list[str]) -> str:
    """What explain says of a region's routed experts."""
    return (f"{region}: routed experts {', '.join(paths)} run outside the capture, as transformers runs them "
            "(a loop over the experts that received tokens, whose shapes are data: captured, it would be "
            "captured again at every step); sloth_fx has no fused MoE op yet")
