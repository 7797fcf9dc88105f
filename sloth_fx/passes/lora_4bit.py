"""PEFT's LoRA over a bitsandbytes ``Linear4bit`` base (QLoRA), found in a Dynamo graph.

PEFT's bnb layer computes (``peft.tuners.lora.bnb.Linear4bit.forward``, outside autocast)::

    result = base_layer(x).clone()
    result = result + (lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling).to(result.dtype)

and ``base_layer(x)`` is ``bnb.matmul_4bit(x.to(compute_dtype), W, quant_state=W.quant_state)
.to(x.dtype)``. Dynamo captures that product as ``torch.ops.bitsandbytes.gemm_4bit(x,
W.view(-1, 1), shape, <lifted quant-state tensors>...)``: directly when ``x`` needs no grad, and
inside an ``autograd_function_apply`` (bitsandbytes' ``MatMul4Bit``) whose forward body holds the
call when it does. ``W`` is the ``Params4bit`` parameter itself, a graph input: Dynamo passes the
module's live parameter, ``quant_state`` and all, so the fused op gets it as its weight argument
and dequantizes with the real state; the lifted quant-state tensors are left unused.

``sloth_fx/passes/lora.py`` puts these matches into the same sibling groups as dense ones; their base
shape comes from :func:`weight_shape` (the quant state), not from the packed uint8 tensor.

Refused, with the reason: ``lora_dropout > 0`` (fused over a dense base by ``sloth_fx/passes/lora.py``, not
yet here); a compute dtype other than ``x``'s (bitsandbytes
would compute the product in another precision than the fused op); a bias on the 4-bit base;
an intermediate used outside the LoRA sum. DoRA and other LoRA variants have other graphs and do
not match.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.rewrite.canonicalize import CAST
from sloth_fx.rewrite.graph_edit import fake_value
from sloth_fx.rewrite.patterns import Match, find_matches, trace_pattern

VIEWS = ("view", torch.Tensor.view)
Base4bit = tuple[fx.Node, fx.Node, tuple[int, int], list[fx.Node], "str | None"]  # x, W, [out, in], nodes, reason


def peft_lora_4bit(base, x, lora_a, lora_b, scale, adapter_dtype, result_dtype):
    return base + (F.linear(F.linear(x.to(adapter_dtype), lora_a, None), lora_b, None) * scale).to(result_dtype)


def peft_lora_4bit_with_dropout(base, x, lora_a, lora_b, scale, p, adapter_dtype, result_dtype):
    dropped = F.dropout(x.to(adapter_dtype), p, True, False)
    return base + (F.linear(F.linear(dropped, lora_a, None), lora_b, None) * scale).to(result_dtype)


# ``base`` is any node here: the pattern fixes the adapter term; _base_4bit checks the base.
PATTERN = trace_pattern(peft_lora_4bit, ("scale", "adapter_dtype", "result_dtype"))
DROPOUT = trace_pattern(peft_lora_4bit_with_dropout, ("scale", "p", "adapter_dtype", "result_dtype"))


@dataclass
class QuantLoRAMatch(Match):
    """A :class:`Match` whose ``inputs["weight"]`` is a ``Params4bit`` graph input (packed uint8 in
    the graph's example values), with the ``[out, in]`` shape it was quantized from."""

    weight_shape: tuple[int, int] = (0, 0)


def find_4bit_lora(gm: fx.GraphModule) -> list[tuple[QuantLoRAMatch, str | None]]:
    """Every PEFT LoRA linear over a bitsandbytes 4-bit base in ``gm`` (canonicalized), with the
    4-bit reason it must not be fused, or ``None`` (``sloth_fx/passes/lora.py`` then checks the adapters
    as it does for a dense base).

    Each match binds ``inputs`` ``x`` (the layer's input), ``weight`` (the ``Params4bit``),
    ``lora_a``, ``lora_b``; ``literals["scale"]``; ``output`` (the sum); ``nodes`` (the adapter
    term and the whole base product, down to the view of the weight). ``gm`` is not changed.
    """
    found: list[tuple[QuantLoRAMatch, str | None]] = []
    seen: set[fx.Node] = set()
    for pattern in (DROPOUT, PATTERN):
        for adapter in find_matches(gm.graph, pattern):
            base = _base_4bit(gm, adapter.inputs["base"])
            if base is None or adapter.output in seen:
                continue  # a dense base (sloth_fx/passes/lora.py's own), or a dropout match already refused
            seen.add(adapter.output)
            x, weight, shape, base_nodes, reason = base
            inputs = {k: v for k, v in adapter.inputs.items() if k != "base"}
            match = QuantLoRAMatch(pattern, adapter.output, inputs | {"weight": weight}, dict(adapter.literals),
                                   list(dict.fromkeys(adapter.nodes + base_nodes)), shape)
            if pattern is DROPOUT:
                reason = (f"lora_dropout p={adapter.literals['p']} over a 4-bit base: not fused (dense bases are; "
                          "the 4-bit pattern does not yet hand the dropout's output to the fused op)")
            elif x is not inputs["x"]:
                reason = "the 4-bit product and the adapters read different inputs"
            found.append((match, reason))
    return found


def weight_shape(match: Match) -> tuple[int, int]:
    """The base weight's ``[out, in]``: the quantized shape for a 4-bit match, else the tensor's."""
    if isinstance(match, QuantLoRAMatch):
        return match.weight_shape
    out_features, in_features = fake_value(match.inputs["weight"]).shape
    return out_features, in_features


def _base_4bit(gm: fx.GraphModule, node: fx.Node) -> Base4bit | None:
    """Walk ``clone(gemm_4bit(x, W.view(-1, 1), ...).to(x.dtype))`` back from ``node``:
    ``(x, W, [out, in], nodes, reason)``, or ``None`` when ``node`` is no bitsandbytes 4-bit product."""
    nodes: list[fx.Node] = []
    reason = None
    if _is_call(node, torch.Tensor.clone):  # PEFT's defensive clone
        nodes.append(node)
        node = node.args[0]
    if _is_call(node, CAST):  # .to(x.dtype), left in the graph only when the product's dtype is not x's
        nodes.append(node)
        reason = f"bitsandbytes' product is {fake_value(node.args[0]).dtype}, not the input's {fake_value(node).dtype}"
        node = node.args[0]
    found = _gemm_4bit(gm, node, nodes)
    if found is None:
        return None
    gemm, operand = found
    x, weight = operand.get(gemm.args[0], gemm.args[0]), _params4bit(gm, gemm.args[1], operand, nodes)
    if weight is None or not isinstance(x, fx.Node) or x.graph is not gm.graph:
        return None
    if _is_call(x, CAST):  # Linear4bit's x.to(compute_dtype), left in the graph only when it casts
        nodes.append(x)
        reason = f"bitsandbytes compute dtype {fake_value(x).dtype} is not the input's {fake_value(x.args[0]).dtype}"
        x = x.args[0]
    if gemm.kwargs.get("bias") is not None:
        reason = reason or "a bias on the 4-bit base (not fused yet)"
    out_features, in_features = gemm.args[2]
    return x, weight, (int(out_features), int(in_features)), nodes, reason


def _gemm_4bit(gm: fx.GraphModule, node: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node, dict[fx.Node, Any]] | None:
    """The ``gemm_4bit`` call that computes ``node`` and a map from its graph's placeholders to
    ``gm``'s nodes: the call itself, or the one in the forward body of the
    ``autograd_function_apply`` (bitsandbytes' MatMul4Bit) whose first output ``node`` is, whose
    placeholders are the apply's operands."""
    if _is_gemm_4bit(node):
        nodes.append(node)
        return node, {}
    if not (_is_call(node, operator.getitem) and node.args[1] == 0):
        return None
    apply = node.args[0]
    if not _is_call(apply, torch.ops.higher_order.autograd_function_apply):
        return None
    fwd_attr, bwd_attr, *operands = apply.args
    body = getattr(gm, fwd_attr.target, None) if fwd_attr.op == "get_attr" else None
    gemms = [n for n in body.graph.nodes if _is_gemm_4bit(n)] if isinstance(body, fx.GraphModule) else []
    if len(gemms) != 1:
        return None
    nodes += [node, apply, fwd_attr, bwd_attr]
    return gemms[0], dict(zip((n for n in body.graph.nodes if n.op == "placeholder"), operands))


def _params4bit(gm: fx.GraphModule, packed: Any, operand: dict[fx.Node, Any], nodes: list[fx.Node]) -> fx.Node | None:
    """The ``Params4bit`` graph input behind the packed operand (views of it, in ``gm`` or in the
    MatMul4Bit body), or ``None``. At run time Dynamo passes the module's parameter itself."""
    while isinstance(packed, fx.Node) and (_is_view(packed) or packed in operand):
        if packed in operand:
            packed = operand[packed]
            continue
        if packed.graph is gm.graph:
            nodes.append(packed)
        packed = packed.args[0]
    ok = isinstance(packed, fx.Node) and packed.op == "placeholder" and packed.graph is gm.graph
    return packed if ok else None


def _is_call(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _is_view(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in VIEWS


def _is_gemm_4bit(node: Any) -> bool:
    # by name: the op exists only once bitsandbytes is imported, and a graph holding it imported it
    target = getattr(node, "target", None)
    return isinstance(target, torch._ops.OpOverload) and target.name() == "bitsandbytes::gemm_4bit"
