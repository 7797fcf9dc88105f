"""LoRA pass: PEFT's LoRA linears -> ``lora_linear`` / ``lora_linear_group``.

PEFT computes ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``, cast back to the base
dtype. Where the base is a dense linear (``nn.Linear``, or Falcon's ``x @ W.T``) the linears are
found by ``sloth_fx/passes/lora_match.py``, over a bitsandbytes 4-bit base (QLoRA) by
``sloth_fx/passes/lora_4bit.py``; both join the same sibling groups, and the fused op
dequantizes a 4-bit base itself. Linears that share their input (q, k, v on the attention input;
gate and up on the MLP input) become one grouped op that reads ``x`` once and accumulates their
input gradients into one buffer. Adapters stay PEFT's own parameters: the fused op reads them as
graph inputs.

With ``lora_dropout > 0`` the adapters read ``xd = dropout(x.to(A.dtype))``: the dropout (and the
cast before it) stays in the graph as it is, so its random numbers are drawn as PEFT draws them
and a checkpoint's recompute replays them, and the fused op takes ``xd`` as the adapters' input
(``lora_linear(..., xd=xd)``: ``x·Wᵀ + s·(xd·Aᵀ)·Bᵀ``). Each PEFT linear has its own dropout and
mask, so such a linear is its own op: siblings share no ``xd·Aᵀ``.

An adapter bias (``LoraConfig(lora_bias=True)``: ``lora_B`` has a bias ``b_B``) is the op's bias:
PEFT's ``(x·Wᵀ + b) + s·((x·Aᵀ)·Bᵀ + b_B)`` is ``x·Wᵀ + (b + s·b_B) + s·(x·Aᵀ)·Bᵀ``, the op's
``bias`` the small ``[out]`` sum ``b + s·b_B`` formed in the graph, through which autograd gives
``b_B`` its gradient. The op adds a bias in the base dtype: an adapter bias in another dtype
(fp32 adapters on a 16-bit base) is refused, with the reason.

The fused op takes PEFT's cast back to the base dtype in: with fp32 adapters on a bf16 model it
returns the base dtype, rounded once from an fp32 sum, and never builds PEFT's fp32 ``[T, out]``
tensors. A wide sum that is not cast back is refused. Refused too, with the reason, never
half-applied: a weight that is not a plain 2-D tensor, or an input in another dtype than the base
weight; ``lora_dropout > 0`` over a 4-bit base. Where the graph writes into a LoRA output in
place (OLMo's ``clamp_``), the output is copied first (``sloth_fx/passes/in_place.py``).

After the rewrite, every adapter still computed in the graph that no refused match covers gets
its reason too (``sloth_fx/passes/lora_census.py``): DoRA, a base that is not a linear, a layer
split by a graph break.

Explain names each fused linear's forms, forward and dX (factored, merged or stacked:
``sloth_fx/kernels/lora_plan.py``), as the cost model picks them at the capture's token count and
as the op took them at the token counts it ran (:class:`FormsNote`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from sloth_fx.rewrite.graph_edit import NotSchedulable, erase_dead, fake_value, replace_with_call
from sloth_fx.rewrite.graph_walk import op_name
from sloth_fx.kernels.lora import lora_linear, lora_linear_group, lora_linear_supports
from sloth_fx.kernels.lora_forms import FormsTaken, group_plans, records
from sloth_fx.kernels.lora_plan import LoRAPlan
from sloth_fx.kernels.toolkit import SUPPORTED_DTYPES, dtype_names
from sloth_fx.rewrite.pass_manager import register_pass
# written_arguments was defined here, and is still imported from here (tests/passes/test_olmo.py)
from sloth_fx.passes.in_place import copy_for_writes, in_place_writers, written_arguments  # noqa: F401
from sloth_fx.passes.lora_4bit import QuantLoRAMatch, find_4bit_lora, weight_shape
from sloth_fx.passes.lora_census import unfused_adapters
from sloth_fx.passes.lora_match import find_dense_lora
from sloth_fx.rewrite.census import with_census
from sloth_fx.rewrite.patterns import Match
from sloth_fx.rewrite.engine import Rewrite, Site, output_path


def find(gm: fx.GraphModule) -> list[tuple[Match, str | None]]:
    """Dense matches, then 4-bit ones with their 4-bit reasons."""
    return [(m, None) for m in find_dense_lora(gm)] + find_4bit_lora(gm)


def siblings(match: Match) -> fx.Node:
    """Linears that read one input are one op; a linear with its own dropout is alone, keyed by
    its dropout node."""
    return match.inputs.get("xd", match.inputs["x"])


def replace(gm: fx.GraphModule, matches: list[Match]) -> list[Site]:
    graph = gm.graph
    names = [output_path(m) for m in matches]
    x = matches[0].inputs["x"]
    biases = [op_bias(graph, m) for m in matches]
    args = (
        x,
        [m.inputs["weight"] for m in matches],
        [m.inputs["lora_a"] for m in matches],
        [m.inputs["lora_b"] for m in matches],
        [float(m.literals["scale"]) for m in matches],
        biases,
    )
    nodes = [n for m in matches for n in m.nodes]
    writers = [in_place_writers(m.output) for m in matches]
    fn, kwargs = lora_linear_group, {}
    if len(matches) == 1:  # one output: the single op, which returns a tensor rather than a tuple
        fn, args = lora_linear, tuple(a[0] if isinstance(a, list) else a for a in args)
        if "xd" in matches[0].inputs:
            kwargs = {"xd": matches[0].inputs["xd"]}
    try:
        call = replace_with_call(graph, [m.output for m in matches], nodes, fn, args, kwargs)
    except NotSchedulable:
        erase_dead(graph, [b for b in biases if b is not None])  # op_bias's new nodes, if any
        raise
    outputs = [call] if len(matches) == 1 else sorted(call.users, key=lambda item: item.args[1])
    for output, written in zip(outputs, writers):
        if written:
            copy_for_writes(graph, output)
    value = fake_value(x)
    tokens = math.prod(_hint(d) for d in value.shape[:-1])
    adapters = [fake_value(m.inputs["lora_a"]) for m in matches]
    shape = (_hint(value.shape[-1]), tuple(weight_shape(m)[0] for m in matches), tuple(a.shape[0] for a in adapters),
             value.dtype, adapters[0].dtype, tuple(isinstance(m, QuantLoRAMatch) for m in matches), True)
    plans = group_plans(tokens, shape, value.device)
    taken = records(shape)  # what the op records of the forms it runs, in this capture (None outside one)
    sites = []
    for index, (m, name, written, a) in enumerate(zip(matches, names, writers, adapters)):
        out_features, in_features = weight_shape(m)
        together = f", x read once for {len(matches)} linears" if len(matches) > 1 else ""
        ops = ", ".join(dict.fromkeys(op_name(w) for w in written))
        copied = f", output copied for the in-place {ops}" if ops else ""
        dropout = f", lora_dropout p={m.literals['p']} kept in the graph" if "xd" in m.inputs else ""
        adapter_bias = ", lora_bias added to the op's bias" if "lora_b_bias" in m.inputs else ""
        what = f"{in_features}->{out_features}, r={a.shape[0]}{together}{dropout}{adapter_bias}{copied}"
        if dropout:
            sites.append(Site(name, what, f"{name}: forward and dX factored (the adapters read the dropout's output, not x)"))
            continue
        sites.append(Site(name, what, FormsNote(name, index, tokens, plans[index], taken)))  # type: ignore[arg-type]
    return sites


@dataclass(frozen=True)
class FormsNote:
    """Explain's line on the forms of one fused LoRA linear (factored, merged or stacked, for the
    forward and for dX): the cost model's pick at the capture's token count, and the forms the op
    took at the token counts it ran (:class:`~sloth_fx.kernels.lora_forms.FormsTaken`). A pass
    note is text made once, but the op decides per call, so this one is an object that explain
    formats when it renders, with the calls made until then."""

    name: str
    index: int  # the linear's place in its group
    tokens: int
    plan: LoRAPlan
    taken: FormsTaken | None  # the forms groups of this shape ran in, in this capture

    def __str__(self) -> str:
        # the picked forms beside PEFT's order; every form's time is lora-plans' (benchmarks/lora_plans.py)
        picked = (f"forward {self.plan.forward}", "forward peft", f"dX {self.plan.backward_dx}", "dX peft")
        costs = ", ".join(f"{k} {self.plan.predicted[k] * 1e6:.1f} us" for k in picked if k in self.plan.predicted)
        ran = [f"forward {forms[self.index][0]}, dX {forms[self.index][1]} at {lo}" + (f"-{hi}" if hi > lo else "")
               + " tokens" for forms, (lo, hi) in (self.taken.spans.items() if self.taken else ())]
        return (f"cost model at {self.tokens} tokens for {self.name}: forward {self.plan.forward}, "
                f"dX {self.plan.backward_dx} ({costs}); ran: {'; '.join(ran) or 'not yet'}")


def op_bias(graph: fx.Graph, match: Match) -> fx.Node | None:
    """The fused op's bias for ``match``: the base's, plus ``s·b_B`` where the adapter has a bias
    (the module doc), as new nodes placed after both biases and given the LoRA layer's module."""
    bias, adapter_bias = match.inputs.get("bias"), match.inputs.get("lora_b_bias")
    if adapter_bias is None:
        return bias
    scale = float(match.literals["scale"])
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max((b for b in (bias, adapter_bias) if b is not None), key=order.__getitem__)
    while anchor.next.op == "placeholder":  # graph inputs come first
        anchor = anchor.next
    with graph.inserting_after(anchor):
        scaled = graph.call_function(torch.mul, (adapter_bias, scale))
    new = {scaled: fake_value(adapter_bias) * scale}
    total = scaled
    if bias is not None:
        with graph.inserting_after(scaled):
            total = graph.call_function(torch.add, (bias, scaled))
        new[total] = fake_value(bias) + new[scaled]
    for node, value in new.items():
        node.meta.update(example_value=value, nn_module_stack=dict(match.output.meta.get("nn_module_stack", {})))
    return total


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
    adapter_bias = fake_value(match.inputs.get("lora_b_bias"))
    if reason is None and adapter_bias is not None and adapter_bias.dtype != x.dtype:
        reason = (f"the adapter's bias (lora_bias=True) is {adapter_bias.dtype} on a {x.dtype} base: PEFT adds it in "
                  f"{adapter_bias.dtype}, the fused op adds a bias in the base dtype")
    if reason is None:
        a, b, bias = (fake_value(match.inputs.get(name)) for name in ("lora_a", "lora_b", "bias"))
        reason = lora_linear_supports(x, w, a, b, float(match.literals["scale"]),
                                      adapter_bias if bias is None else bias)
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


register_pass("lora", with_census(Rewrite((), refusal, replace, group=siblings, find=find), unfused_adapters))
