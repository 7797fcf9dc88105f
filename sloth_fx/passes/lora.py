"""LoRA pass: PEFT's LoRA over ``nn.Linear`` -> ``lora_linear`` / ``lora_linear_group``.

PEFT computes ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``. The pattern is that sum
with the base a plain linear (with or without bias) and the adapter input ``x`` cast or not to the
adapters' dtype. Linears that share their input (q, k, v on the attention input; gate and up on
the MLP input) become one grouped op that reads ``x`` once and accumulates their input gradients
into one buffer.

With ``lora_dropout > 0`` the adapters read ``xd = dropout(x.to(A.dtype))``: the dropout (and the
cast before it) stays in the graph as it is, so its random numbers are drawn as PEFT draws them
and a checkpoint's recompute replays them, and the fused op takes ``xd`` as the adapters' input
(``lora_linear(..., xd=xd)``: ``x·Wᵀ + s·(xd·Aᵀ)·Bᵀ``). Each PEFT linear has its own dropout and
mask, so such a linear is its own op: siblings share no ``xd·Aᵀ``. ``p = 0`` or ``training=False``
dropouts, where Dynamo records them, are kept and read the same way.

Refused, with the reason, never half-applied: a weight that is not a plain 2-D tensor, or an input
in another dtype than the base weight; ``lora_dropout > 0`` over a 4-bit base (``sloth_fx/passes/lora_4bit.py``).

The pattern ends with PEFT's cast back to the base dtype (``result.to(torch_result_dtype)``,
absent from the graph when adapters and base share a dtype). With fp32 adapters on a bf16 model
the fused op takes the cast in: it returns the base dtype, rounded once from an fp32 sum, and
never builds PEFT's fp32 ``[T, out]`` tensors. A wide sum that is not cast back is refused.

The fused ops return views (of buffers made inside them), and autograd forbids writing into a
custom Function's view outputs. Where the graph writes into a LoRA output in place (OLMo's
``query_states.clamp_(-clip_qkv, clip_qkv)``), that one output is copied (``clone``) right after
the fused op and the copy takes every use of it: the copy is exact, costs one ``[T, out]`` read and
write, and its backward passes the gradient through unchanged.

PEFT's LoRA over a bitsandbytes 4-bit base (QLoRA) is found by ``sloth_fx/passes/lora_4bit.py`` and joins the
same sibling groups; the fused op dequantizes the base itself. DoRA and merged adapters do not match.
Adapters stay PEFT's own parameters: the fused op reads them as graph inputs.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from sloth_fx.rewrite.graph_edit import fake_value, replace_with_call
from sloth_fx.kernels.lora import lora_linear, lora_linear_group, lora_linear_supports
from sloth_fx.kernels.lora_plan import lora_plan
from sloth_fx.kernels.toolkit import SUPPORTED_DTYPES, dtype_names
from sloth_fx.rewrite.pass_manager import register_pass
from sloth_fx.passes.lora_4bit import QuantLoRAMatch, find_4bit_lora, weight_shape
from sloth_fx.rewrite.patterns import Match, find_matches, trace_pattern
from sloth_fx.rewrite.engine import Rewrite, Site, output_path

def peft_lora(x, weight, lora_a, lora_b, scale, adapter_dtype, result_dtype):
    result = F.linear(x, weight, None)
    return (result + F.linear(F.linear(x.to(adapter_dtype), lora_a, None), lora_b, None) * scale).to(result_dtype)


def peft_lora_with_bias(x, weight, bias, lora_a, lora_b, scale, adapter_dtype, result_dtype):
    result = F.linear(x, weight, bias)
    return (result + F.linear(F.linear(x.to(adapter_dtype), lora_a, None), lora_b, None) * scale).to(result_dtype)


def peft_lora_dropout(x, weight, lora_a, lora_b, scale, p, training, adapter_dtype, result_dtype):
    result = F.linear(x, weight, None)
    dropped = F.dropout(x.to(adapter_dtype), p, training, False)
    return (result + F.linear(F.linear(dropped, lora_a, None), lora_b, None) * scale).to(result_dtype)


def peft_lora_dropout_with_bias(x, weight, bias, lora_a, lora_b, scale, p, training, adapter_dtype, result_dtype):
    result = F.linear(x, weight, bias)
    dropped = F.dropout(x.to(adapter_dtype), p, training, False)
    return (result + F.linear(F.linear(dropped, lora_a, None), lora_b, None) * scale).to(result_dtype)


PATTERNS = [trace_pattern(f, ("scale", "adapter_dtype", "result_dtype")) for f in (peft_lora, peft_lora_with_bias)]
DROPOUT_PATTERNS = [trace_pattern(f, ("scale", "p", "training", "adapter_dtype", "result_dtype"))
                    for f in (peft_lora_dropout, peft_lora_dropout_with_bias)]


def find(gm: fx.GraphModule) -> list[tuple[Match, str | None]]:
    """Dense matches (with and without dropout), then 4-bit ones with their 4-bit reasons."""
    matches = [m for pattern in PATTERNS for m in find_matches(gm.graph, pattern)]
    matches += [_keep_dropout(m) for pattern in DROPOUT_PATTERNS for m in find_matches(gm.graph, pattern)]
    # With fp32 adapters the pattern matches at the cast back and, cast absent, at the sum it
    # casts: the larger match (the one that takes the cast) is the rewrite.
    inner = {n for m in matches for n in m.nodes if n is not m.output}
    return [(m, None) for m in matches if m.output not in inner] + find_4bit_lora(gm)


def siblings(match: Match) -> fx.Node:
    """Linears that read one input are one op; a linear with its own dropout is alone, keyed by
    its dropout node."""
    return match.inputs.get("xd", match.inputs["x"])


def _keep_dropout(match: Match) -> Match:
    """A dropout match without its dropout and the cast before it, which stay in the graph as
    they are: the dropout's output is bound as ``inputs["xd"]``, the adapters' input."""
    (xd,) = [n for n in match.nodes if n.target is F.dropout]
    kept = {xd} | {a for a in xd.args[:1] if a in match.nodes}
    match.nodes = [n for n in match.nodes if n not in kept]
    match.inputs["xd"] = xd
    return match


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    graph = gm.graph
    names = [output_path(m) for m in matches]
    x = matches[0].inputs["x"]
    args = (
        x,
        [m.inputs["weight"] for m in matches],
        [m.inputs["lora_a"] for m in matches],
        [m.inputs["lora_b"] for m in matches],
        [float(m.literals["scale"]) for m in matches],
        [m.inputs.get("bias") for m in matches],
    )
    nodes = [n for m in matches for n in m.nodes]
    writers = [in_place_writers(m.output) for m in matches]
    fn, kwargs = lora_linear_group, {}
    if len(matches) == 1:  # one output: the single op, which returns a tensor rather than a tuple
        fn, args = lora_linear, tuple(a[0] if isinstance(a, list) else a for a in args)
        if "xd" in matches[0].inputs:
            kwargs = {"xd": matches[0].inputs["xd"]}
    call = replace_with_call(graph, [m.output for m in matches], nodes, fn, args, kwargs)
    outputs = [call] if len(matches) == 1 else sorted(call.users, key=lambda item: item.args[1])
    for output, written in zip(outputs, writers):
        if written:
            _copy_for_writes(graph, output)
    value = fake_value(x)
    tokens = math.prod(_hint(d) for d in value.shape[:-1])
    sites = []
    for m, name, written in zip(matches, names, writers):
        (out_features, in_features), a = weight_shape(m), fake_value(m.inputs["lora_a"])
        together = f", x read once for {len(matches)} linears" if len(matches) > 1 else ""
        ops = ", ".join(dict.fromkeys(_op_name(w) for w in written))
        copied = f", output copied for the in-place {ops}" if ops else ""
        dropout = f", lora_dropout p={m.literals['p']} kept in the graph" if "xd" in m.inputs else ""
        what = f"{in_features}->{out_features}, r={a.shape[0]}{together}{dropout}{copied}"
        if dropout:
            sites.append(Site(name, what, f"{name}: forward and dX factored (the adapters read the dropout's output, not x)"))
            continue
        plan = lora_plan(tokens, in_features, out_features, a.shape[0], value.element_size())
        costs = ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in plan.predicted.items())
        sites.append(Site(name, what, f"cost model at {tokens} tokens for {name}: forward {plan.forward}, "
                                      f"dX {plan.backward_dx} ({costs})"))
    return sites


def in_place_writers(node: fx.Node) -> list[fx.Node]:
    """The nodes that write in place into ``node``'s value or into a view of it.

    A view is a node whose example value shares ``node``'s storage (``view``, slicing, ``clamp_``'s
    own result, ...), followed from user to user; a node writes into the arguments that
    :func:`written_arguments` names.
    """
    storage = _storage(node)
    if storage is None:
        return []
    aliases, todo, writers = {node}, [node], []
    while todo:
        for user in todo.pop().users:
            if any(isinstance(w, fx.Node) and w in aliases for w in written_arguments(user)):
                writers.append(user)
            if user not in aliases and _storage(user) == storage:
                aliases.add(user)
                todo.append(user)
    return list(dict.fromkeys(writers))


AUGMENTED = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift")
IN_PLACE_OPERATORS = {getattr(operator, f"i{op}") for op in AUGMENTED} | {operator.setitem}
IN_PLACE_DUNDERS = {f"__i{op}__" for op in AUGMENTED} | {"__setitem__"}


def written_arguments(node: fx.Node) -> list[Any]:
    """The arguments ``node`` writes into: those its schema marks written for an aten op; ``self``
    for an in-place method or function (a name ending in ``_``: ``clamp_``, ``add_``; ``x += y``,
    ``x[i] = y``; ``inplace=True``); ``out=``."""
    if node.op not in ("call_method", "call_function"):
        return []
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        arguments = enumerate(target._schema.arguments)
        return [node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
                for i, a in arguments if a.alias_info is not None and a.alias_info.is_write]
    name = _op_name(node)
    in_place = (name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_DUNDERS
    if in_place or target in IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return list(node.args[:1])
    return [node.kwargs["out"]] if "out" in node.kwargs else []


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _storage(node: fx.Node) -> int | None:
    """Which storage ``node``'s example value lives in (its address: the values are all alive)."""
    value = fake_value(node)
    return value.untyped_storage()._cdata if isinstance(value, torch.Tensor) else None


def _copy_for_writes(graph: fx.Graph, output: fx.Node) -> None:
    """Give every use of the fused op's ``output`` a copy of it instead, which may be written in
    place (the output itself is a view that autograd forbids writing into)."""
    with graph.inserting_after(output):
        copy = graph.call_function(torch.Tensor.clone, (output,))
    copy.meta = dict(output.meta)
    output.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)


def _hint(size: int | torch.SymInt) -> int:
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def refusal(match: Match) -> str | None:
    """Why a LoRA linear must not be fused, or None: the adapters' checks, and for a dense base
    its weight and dtype (a 4-bit base's were checked where it was found)."""
    if isinstance(match, QuantLoRAMatch):
        return _adapter_refusal(match)
    w = fake_value(match.inputs["weight"])
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "the base weight is not a plain 2-D tensor"
    reason = _adapter_refusal(match)
    x = fake_value(match.inputs["x"])
    if reason is None and x.dtype != w.dtype:
        reason = f"input {x.dtype}, base {w.dtype}: the fused op needs x and W alike" + _autocast_hint(x, w.dtype)
    if reason is None:
        a, b, bias = (fake_value(match.inputs.get(name)) for name in ("lora_a", "lora_b", "bias"))
        reason = lora_linear_supports(x, w, a, b, float(match.literals["scale"]), bias)
    return reason


def _adapter_refusal(match: Match) -> str | None:
    """What a dense and a 4-bit base have in common: x's dtype, A and B alike, the sum cast back
    to x's dtype, a constant scale, no intermediate used elsewhere."""
    x, y = fake_value(match.inputs["x"]), fake_value(match.output)
    a, b = fake_value(match.inputs["lora_a"]), fake_value(match.inputs["lora_b"])
    if not all(isinstance(t, torch.Tensor) for t in (x, a, b)):
        return "an input of the LoRA linear is not a tensor"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not one of {dtype_names(SUPPORTED_DTYPES)}"
    if a.dtype != b.dtype:
        return f"adapters {a.dtype}/{b.dtype}: the fused op needs A and B alike"
    if not isinstance(y, torch.Tensor) or y.dtype != x.dtype:
        return (f"the LoRA sum is used in {getattr(y, 'dtype', '?')}, not cast back to the base's {x.dtype}"
                + _autocast_hint(x, x.dtype))
    if not isinstance(match.literals["scale"], (int, float)):
        return "the LoRA scaling is not a constant"
    shared = match.outside_users()
    if shared:
        return f"intermediate {shared[0].name} is also used outside the LoRA sum"
    return None


def _autocast_hint(x: torch.Tensor, base: torch.dtype) -> str:
    """What to set when autocast made the dtypes differ: Trainer's ``bf16=True``/``fp16=True``
    (SFTConfig's and DPOConfig's default) runs a float32 base's linears in the narrow dtype, and
    the fused op, which keeps one dtype from x to the sum, would not round as autocast does."""
    device = x.device.type
    if base != torch.float32 or not torch.is_autocast_enabled(device):
        return ""
    dtype = torch.get_autocast_dtype(device)
    flag = "bf16" if dtype == torch.bfloat16 else "fp16"
    return f" (autocast runs this float32 base in {dtype}: load the base in {dtype} to fuse it, or set {flag}=False)"


register_pass("lora", Rewrite((), refusal, replace, group=siblings, find=find))
