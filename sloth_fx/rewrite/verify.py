"""Judge a rewritten graph by how close it comes to a float64 run of its original.

Three runs on the same random inputs, forward and then backward from the same random cotangents:

- the truth ``t``: a copy of the original graph run as float64. Floating inputs are cast to
  float64; in the copy and in every body graph in it (checkpointed layers, custom backward bodies,
  which may run during backward) every floating dtype constant (``.to(torch.bfloat16)``,
  ``dtype=``) is float64 and ``.float()``, ``.half()``, ``.bfloat16()`` are ``.double()``;
  factories that name no dtype make float64. Fused ops already in the original (put there by
  earlier passes, each verified in turn) run as their plain-PyTorch references (``<op>_reference``
  beside the op in ``sloth_fx.kernels``), which are the original's operations. Ops registered
  outside aten (bitsandbytes' 4-bit product and dequantization) have no float64 kernel to count
  on: they run in float32, their widest (operands rounded to it, results widened);
- the original ``o`` and the rewrite ``r``, each at its real dtypes.

For every output and every input gradient, with ``e(x) = ||x - t|| / ||t||`` (``||x - t||``
where ``t`` is zero; a norm, since elementwise comparisons mean nothing for sums of many rounded
terms), the rewrite is kept when

    e(r) <= FACTOR * e(o) + eps(dtype)

that is, no more than a few times as far from the truth as the original itself, plus one rounding
of the value's dtype for values the original computes exactly (``eps`` is 0 for integer values,
which must be exact). A bf16 model's fp32 adapter gradients are thus judged against the error the
bf16 original makes in them, not at fp32 tolerance. A NaN or infinity anywhere in a compared value
makes its error NaN, which never passes; so does an original that cannot run in float64.

Floating inputs are replaced by fresh random tensors of the same shape, dtype and spread (keeping
which of them require grad); integer and boolean inputs (token ids, positions, masks) keep their real
values, since they index. Quantized weights (anything with a ``quant_state``, such as bitsandbytes'
``Params4bit``) and the tensors of their quant states, which Dynamo lifts to inputs of their own,
stay the real objects in every run: the original graph dequantizes with the lifted tensors while a
rewrite may read the weight's own ``quant_state``, so both must describe the same weight.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_map_only

FACTOR = 4.0
NARROW = (torch.float16, torch.bfloat16, torch.float32)
NARROWING_METHODS = ("float", "half", "bfloat16")
NARROWING_FUNCTIONS = {getattr(torch.Tensor, name) for name in NARROWING_METHODS}


@dataclass(frozen=True)
class Verdict:
    """``ok``: every value within its bound; ``worst``: the largest ``e(r) / bound`` (at most 1 when
    ok; ``inf`` or NaN for a structural mismatch or a NaN); ``detail``: where, in words."""

    ok: bool
    worst: float
    detail: str


@dataclass
class _Run:
    outputs: list[Any]
    grads: list[torch.Tensor | None]


def concrete(example_inputs: Sequence[Any]) -> bool:
    """True when the example inputs are real values (not fake tensors) that a check can run on."""
    return not any(isinstance(x, FakeTensor) for x in example_inputs)


def random_inputs(example_inputs: Sequence[Any], seed: int) -> list[Any]:
    gen = torch.Generator().manual_seed(seed)
    quantization = _quantization_tensors(example_inputs)
    out: list[Any] = []
    for x in example_inputs:
        if id(x) in quantization:
            out.append(x)
        elif isinstance(x, torch.SymInt):
            out.append(int(x.node.hint))
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            # at the example's own scale, so that activations stay as large as in real use
            scale = x.detach().float().std().item() if x.numel() > 1 else 1.0
            scale = scale if scale == scale and scale > 0 else 1.0
            r = (torch.randn(x.shape, generator=gen, dtype=torch.float32) * scale).to(x.dtype).to(x.device)
            out.append(r.requires_grad_(x.requires_grad))
        elif isinstance(x, torch.Tensor):
            out.append(x.detach().clone())
        else:
            out.append(x)
    return out


def _quantization_tensors(example_inputs: Sequence[Any]) -> set[int]:
    """The ids of the inputs that are quantized weights or tensors of their (nested) quant states."""
    weights = [x for x in example_inputs if _quantized(x)]
    ids = {id(w) for w in weights}
    states = [w.quant_state for w in weights]
    while states:
        state = states.pop()
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                ids.add(id(value))
            elif type(value) is type(state):  # bitsandbytes' double quantization: state2
                states.append(value)
    return ids


def compare(rewritten: fx.GraphModule, original: fx.GraphModule, example_inputs: Sequence[Any], seed: int = 0) -> Verdict:
    """Run the original in float64 and both graphs at their dtypes; judge the rewrite (module doc).

    An output the rewrite no longer returns (``None`` where the original returned a tensor, such as
    the logits of the fused loss) is left out of the comparison and gets no cotangent in any run.
    """
    inputs = random_inputs(example_inputs, seed)
    new_leaves, new_out = _forward(rewritten, inputs, seed)
    ref_leaves, ref_out = _forward(original, inputs, seed)
    if len(new_out) != len(ref_out):
        return Verdict(False, float("inf"), f"{len(new_out)} outputs instead of {len(ref_out)}")
    kept = [i for i, (a, b) in enumerate(zip(new_out, ref_out)) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)]
    cotangents = _cotangents(ref_out, kept, seed)
    new = _Run(new_out, _backward(new_out, cotangents, new_leaves))
    ref = _Run(ref_out, _backward(ref_out, cotangents, ref_leaves))
    try:
        with _default_float64():
            keep = _quantization_tensors(inputs)
            widened = [x if id(x) in keep else _widen(x) for x in inputs]
            truth_leaves, truth_out = _forward(_float64_copy(original), widened, seed)
            wide = {i: c.double() for i, c in cotangents.items()}
            truth = _Run(truth_out, _backward(truth_out, wide, truth_leaves))
    except Exception as err:  # an op with no float64 kernel: nothing to judge against
        return Verdict(False, float("nan"), f"the original does not run in float64 ({type(err).__name__}: {err})")
    labels = [f"output {i}" for i in kept] + [f"grad {i}" for i in range(len(ref.grads))]
    values = zip([new.outputs[i] for i in kept] + new.grads, [ref.outputs[i] for i in kept] + ref.grads,
                 [truth.outputs[i] for i in kept] + truth.grads)
    worst, where = 0.0, "-"
    for label, (r, o, t) in zip(labels, values):
        if (r is None) != (o is None) or (o is None) != (t is None):
            return Verdict(False, float("inf"), f"{label}: not every run has a value")
        if o is None:
            continue
        if r.shape != o.shape or r.dtype != o.dtype:
            return Verdict(False, float("inf"), f"{label}: {r.dtype} {tuple(r.shape)} instead of {o.dtype} {tuple(o.shape)}")
        e_r, e_o = _error(r, t), _error(o, t)
        bound = FACTOR * e_o + (torch.finfo(o.dtype).eps if o.is_floating_point() else 0.0)
        used = e_r / bound if bound > 0 else (0.0 if e_r == 0 else float("inf"))
        what = f"{label} ({o.dtype}, {tuple(o.shape)}): error {e_r:.2e} against float64, the original's {e_o:.2e}"
        if not used <= 1.0:  # NaN fails too
            return Verdict(False, used, f"{what}, allowed {bound:.2e}")
        if used >= worst:
            worst, where = used, what
    return Verdict(True, worst, f"worst {where} ({worst:.2f} of the allowance)")


def _forward(gm: fx.GraphModule, inputs: list[Any], seed: int) -> tuple[list[Any], list[Any]]:
    # fresh leaves per run, so that no run sees another's gradients or in-place writes; a
    # quantized weight goes in as itself, since a copy would lose its quant_state
    leaves = [_fresh(x) if isinstance(x, torch.Tensor) and not _quantized(x) else x for x in inputs]
    with torch.random.fork_rng(devices=_devices(leaves)), torch.enable_grad():
        torch.manual_seed(seed)
        outs = gm(*leaves)
    return leaves, list(outs) if isinstance(outs, (tuple, list)) else [outs]


def _quantized(x: Any) -> bool:
    return getattr(x, "quant_state", None) is not None


def _fresh(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(x.requires_grad)


def _widen(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in NARROW:
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def _cotangents(outputs: list[Any], kept: list[int], seed: int) -> dict[int, torch.Tensor]:
    """One random cotangent per differentiable output of the original, in its dtype."""
    gen = torch.Generator().manual_seed(seed + 1)
    diff = [i for i in kept if outputs[i].requires_grad and outputs[i].is_floating_point()]
    return {i: torch.randn(outputs[i].shape, generator=gen).to(outputs[i].dtype).to(outputs[i].device) for i in diff}


def _backward(outputs: list[Any], cotangents: dict[int, torch.Tensor], leaves: list[Any]) -> list[torch.Tensor | None]:
    # an output that lost its graph in a rewrite gives its inputs no gradient: the comparison shows it
    diff = [i for i in cotangents if outputs[i].requires_grad]
    wanted = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    if not diff or not wanted:
        return [None] * len(wanted)
    return list(torch.autograd.grad([outputs[i] for i in diff], wanted, [cotangents[i] for i in diff], allow_unused=True))


def _error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """``||x - t|| / ||t||`` in float64 (``||x - t||`` for ``t = 0``); NaN when either is not finite."""
    x, t = x.detach().double(), truth.detach().double()
    if not (torch.isfinite(x).all() and torch.isfinite(t).all()):
        return float("nan")
    scale = t.norm().item()
    return (x - t).norm().item() / scale if scale > 0 else (x - t).norm().item()


def _float64_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` that runs as float64 (module doc), body graphs included. The graphs
    themselves are rewritten, not the run's context: bodies may run during backward (checkpoint
    recomputation, custom backward bodies), which a torch function mode entered around the run
    does not reach."""
    gm = copy.deepcopy(gm)
    for module in gm.modules():
        if not isinstance(module, fx.GraphModule):
            continue
        for node in module.graph.nodes:
            _widen_node(node)
        module.recompile()
    return gm


def _widen_node(node: fx.Node) -> None:
    """Make one node compute in float64: a custom op in float32 instead, a fused op as its reference."""
    if node.op == "call_function" and _custom_op(node.target):
        node.args, node.target = (node.target, *node.args), in_float32
        return
    node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), _wide_dtype)
    if node.op == "call_method" and node.target in NARROWING_METHODS:
        node.target = "double"
    if node.op != "call_function":
        return
    reference = _reference(node.target)
    if node.target in NARROWING_FUNCTIONS:
        node.target = torch.Tensor.double
    elif reference is not None:
        # what only the fused op takes (plans, memory budgets) chooses how, not what, it computes
        accepted = inspect.signature(reference).parameters
        node.target, node.kwargs = reference, {k: v for k, v in node.kwargs.items() if k in accepted}


def _custom_op(target: Any) -> bool:
    """An op registered outside aten (not a higher-order op such as checkpointing: those run bodies)."""
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and target.namespace not in ("aten", "prims")


def _reference(fn: Any) -> Callable[..., Any] | None:
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    if module is None or not module.__name__.startswith("sloth_fx.kernels."):
        return None
    return getattr(module, f"{getattr(fn, '__name__', '')}_reference", None)


def in_float32(op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``op`` in float32, its widest precision: float64 tensor arguments rounded to it, floating
    dtype arguments replaced by it, narrower floating results widened to float64."""
    args, kwargs = tree_map_only(torch.Tensor, _float32, (args, kwargs))
    args, kwargs = tree_map_only(torch.dtype, _float32_dtype, (args, kwargs))
    return tree_map_only(torch.Tensor, _float64, op(*args, **kwargs))


def _wide_dtype(value: Any) -> Any:
    return torch.float64 if isinstance(value, torch.dtype) and value in NARROW else value


def _float32_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in NARROW or dtype == torch.float64 else dtype


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype == torch.float64 else x


def _float64(x: torch.Tensor) -> torch.Tensor:
    return x.double() if x.dtype in NARROW else x


@contextlib.contextmanager
def _default_float64() -> Iterator[None]:
    """Factories that name no dtype make float64 (forward and backward alike)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def _devices(values: list[Any]) -> list[int]:
    return sorted({x.device.index or 0 for x in values if isinstance(x, torch.Tensor) and x.is_cuda})
