"""Cross-entropy losses left in a graph after the cross-entropy pass, and why they were left.

The pass matches the head and loss as transformers spells them: a bias-free ``lm_head`` linear,
an optional logit scale or soft-cap, the upcast, the flattening and ``cross_entropy``. A loss
whose logits come from anything else matches no pattern, so nothing would say why its logits are
built in full. After the rewrite the pass looks at every ``cross_entropy`` still in the graph
outside the matches it refused (their reasons are logged already) and follows its logits back
through the ops that take one tensor (casts, views, scales, the soft-cap) to the op that made
them (:func:`~sloth_fx.rewrite.graph_walk.maker`), which gives the reason:

- a PEFT LoRA layer (LoRA on ``lm_head``, fused by the LoRA pass or not): the logits are
  ``h·Wᵀ + s·(h·Aᵀ)·Bᵀ``, and the fused loss takes one weight. Folding the adapter in would need a
  loss kernel with the low-rank term (its own work). The existing op could take the concatenations
  ``[W, B]`` and ``[h, s·h·Aᵀ]``, exactly, but it would copy ``W`` every step and form the frozen
  ``W``'s gradient too (one more product the size of the logits' and a ``[vocab, hidden]`` fp32
  buffer), so the loss is left as it is;
- anything else, named by its op and module, or as an input of the graph where Dynamo broke the
  graph between the head and the loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from sloth_fx.rewrite.graph_edit import module_path
from sloth_fx.rewrite.graph_walk import made_by, maker

LORA_HEAD = ("LoRA on the lm_head (target_modules includes it): the logits are h*W^T + s*(h*A^T)*B^T and the "
             "fused loss takes one weight (it would need a kernel with the adapter's low-rank term), so the logits "
             "are built in full and the loss runs as HF's")


def leftover_losses(graph: fx.Graph, refused: Iterable[fx.Node]) -> list[tuple[str, str]]:
    """``(module, reason)`` for each ``cross_entropy`` of ``graph`` outside the nodes of the
    ``refused`` matches: ``module`` is where its logits were made (the module doc)."""
    refused = set(refused)
    leftovers = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is F.cross_entropy and node not in refused:
            logits = node.args[0]
            leftovers.append((module_path(maker(logits)) or "lm_head", _reason(logits)))
    return leftovers


def _reason(logits: fx.Node) -> str:
    modules = (maker(logits).meta.get("nn_module_stack") or {}).values()
    if any(isinstance(kind, type) and issubclass(kind, LoraLayer) for _, kind in modules):
        return LORA_HEAD
    return (f"its logits come from {made_by(logits)}, not from a bias-free linear lm_head, which is what the fused "
            "loss computes")
