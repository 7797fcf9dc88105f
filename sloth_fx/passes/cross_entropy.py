"""Cross-entropy pass: ``lm_head`` + upcast + ``cross_entropy`` -> ``linear_cross_entropy``.

Matches the head-and-loss graph as transformers v5's causal-LM forward spells it: the ``lm_head``
linear (no bias), an optional logit scale in the model dtype (Cohere's ``logits * logit_scale``,
Granite's ``logits / logits_scaling``: multiply and divide are kept apart, as they round apart), the
float upcast, optional Gemma-2 logit soft-capping, the flattening, and
``cross_entropy`` with ``reduction="mean"``, or ``"sum"`` divided by ``num_items_in_batch`` (what
HF passes under gradient accumulation). The label shift and padding stay as they are: the fused op
takes the shifted labels. The logits are never built in full.

The head region only runs compiled while training with grad, so the caller is a training loop:
the logits the graph also returned are returned as ``None`` (as Liger Kernel and Unsloth do); the
report says so. Evaluation, ``no_grad`` and ``generate()`` run the original forward with logits.
A match whose logits feed anything but the loss and the returned value is refused. After the
rewrite, every ``cross_entropy`` left in the graph that no refused match covers is named with the
reason its logits did not match (``sloth_fx/passes/loss_census.py``: LoRA on the ``lm_head``, say).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.rewrite.graph_edit import erase_dead, fake_value, module_path, replace_with_call
from sloth_fx.kernels.cross_entropy import LogitScale, linear_cross_entropy, linear_cross_entropy_supports
from sloth_fx.passes.loss_census import leftover_losses
from sloth_fx.rewrite.census import with_census
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.rewrite.patterns import Match, trace_pattern
from sloth_fx.rewrite.engine import Rewrite, Site

LITERALS = ("vocab", "ignore_index", "reduction", "dtype")


def causal_lm_loss(hidden, weight, labels, vocab, ignore_index, reduction, dtype):
    logits = F.linear(hidden, weight, None).to(dtype)
    return F.cross_entropy(logits.view(-1, vocab), labels, ignore_index=ignore_index, reduction=reduction)


def softcapped_causal_lm_loss(hidden, weight, labels, vocab, ignore_index, reduction, dtype, cap):
    logits = torch.tanh(F.linear(hidden, weight, None) / cap) * cap
    return F.cross_entropy(logits.to(dtype).view(-1, vocab), labels, ignore_index=ignore_index, reduction=reduction)


def multiplied_causal_lm_loss(hidden, weight, labels, vocab, ignore_index, reduction, dtype, multiplier):
    logits = (F.linear(hidden, weight, None) * multiplier).to(dtype)
    return F.cross_entropy(logits.view(-1, vocab), labels, ignore_index=ignore_index, reduction=reduction)


def divided_causal_lm_loss(hidden, weight, labels, vocab, ignore_index, reduction, dtype, divisor):
    logits = (F.linear(hidden, weight, None) / divisor).to(dtype)
    return F.cross_entropy(logits.view(-1, vocab), labels, ignore_index=ignore_index, reduction=reduction)


def fused_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, ignore_index: int,
                         num_items_in_batch: torch.Tensor | int | None, logit_softcap: float | None,
                         scale_op: str | None = None, scale: float = 1.0) -> torch.Tensor:
    """The replacement: flatten the tokens and call the fused op (the logit scale travels as plain
    literals, which the graph's generated code can spell)."""
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, logit_softcap=logit_softcap,
        logit_scale=LogitScale(scale_op, scale) if scale_op else None,
    )


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    (match,) = matches
    loss, num_items = _loss_and_divisor(match)
    if match.literals["reduction"] == "sum" and num_items is None:
        num_items = 1
    returned = [n for n in match.nodes if _returned(n)]
    scale = _logit_scale(match)
    replace_with_call(
        gm.graph, [loss], match.nodes + ([match.output] if loss is not match.output else []),
        fused_causal_lm_loss, (match.inputs["hidden"], match.inputs["weight"], match.inputs["labels"]),
        {"ignore_index": match.literals["ignore_index"], "num_items_in_batch": num_items,
         "logit_softcap": match.literals.get("cap"), **_scale_kwargs(scale)},
    )
    _return_none_for(gm.graph, returned)
    vocab, dtype = match.literals["vocab"], fake_value(match.inputs["hidden"]).dtype
    scaled = f", logits {'*' if scale.op == 'mul' else '/'} {scale.value}" if scale else ""
    return [Site(head_path(match), f"{match.pattern.name}{scaled}, vocab {vocab}, {dtype}, "
                               f"reduction {match.literals['reduction']}" + (", logits returned as None" if returned else ""))]


def head_path(match: Match) -> str:
    return module_path(match.inputs["hidden"]) or "lm_head"


def refusal(match: Match) -> str | None:
    if match.literals["dtype"] not in (None, torch.float32):
        return f"the loss runs in {match.literals['dtype']}, the fused op in float32"
    for name in ("multiplier", "divisor"):
        value = match.literals.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            return f"the logit {name} is {value!r}, not a finite non-zero constant"
    hidden, weight, labels = (fake_value(match.inputs[name]) for name in ("hidden", "weight", "labels"))
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels)):
        return "no shape information for the hidden states, the lm_head weight or the labels"
    reason = linear_cross_entropy_supports(hidden.reshape(-1, hidden.shape[-1]), weight, labels,
                                           ignore_index=match.literals["ignore_index"],
                                           logit_softcap=match.literals.get("cap"), logit_scale=_logit_scale(match))
    if reason:
        return reason
    if match.literals["reduction"] not in ("mean", "sum"):
        return f"reduction {match.literals['reduction']!r} is neither 'mean' nor 'sum'"
    for node in match.outside_users():
        if any(u.op != "output" for u in node.users if u not in match.nodes):
            return f"{node.name} is used by more than the loss (something reads the logits)"
    return None


def _logit_scale(match: Match) -> LogitScale | None:
    if "multiplier" in match.literals:
        return LogitScale("mul", float(match.literals["multiplier"]))
    if "divisor" in match.literals:
        return LogitScale("div", float(match.literals["divisor"]))
    return None


def _scale_kwargs(scale: LogitScale | None) -> dict[str, object]:
    return {"scale_op": scale.op, "scale": scale.value} if scale else {}


def _loss_and_divisor(match: Match) -> tuple[fx.Node, object]:
    """With reduction 'sum', HF divides by ``num_items_in_batch`` right after: fold that in."""
    users = list(match.output.users)
    if match.literals["reduction"] == "sum" and len(users) == 1 and users[0].target is torch.div:
        div = users[0]
        if div.args[0] is match.output and len(div.args) == 2:
            return div, div.args[1]
    return match.output, None


def _returned(node: fx.Node) -> bool:
    return any(u.op == "output" for u in node.users)


def _return_none_for(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """The graph's outputs that were these nodes (the logits) become None."""
    if not nodes:
        return
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = fx.node.map_arg(out.args, lambda n: None if n in nodes else n)
    erase_dead(graph, nodes)


register_pass("cross_entropy", with_census(
    Rewrite([trace_pattern(softcapped_causal_lm_loss, (*LITERALS, "cap")),
             trace_pattern(multiplied_causal_lm_loss, (*LITERALS, "multiplier")),
             trace_pattern(divided_causal_lm_loss, (*LITERALS, "divisor")),
             trace_pattern(causal_lm_loss, LITERALS)],
            refusal, replace, where=head_path),
    leftover_losses,
))
