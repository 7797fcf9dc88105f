"""Check a rewritten graph against its original on the same random inputs, forward and backward.

Floating inputs are replaced by fresh random tensors of the same shape, dtype and spread (keeping
which of them require grad); integer and boolean inputs (token ids, positions, masks) keep their real
values, since they index. Quantized weights (anything with a ``quant_state``, such as bitsandbytes'
``Params4bit``) and the tensors of their quant states, which Dynamo lifts to inputs of their own,
stay the real objects: the original graph dequantizes with the lifted tensors while a rewrite may
read the weight's own ``quant_state``, so both must describe the same weight. Both graphs run
forward, then backward from the same random cotangents; outputs and input gradients must agree
within the dtype's tolerance, measured as ``||a - b|| / ||b||`` (elementwise comparisons are
meaningless for sums of many rounded terms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    worst: float
    detail: str


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
    """Run both graphs on the same random inputs; compare outputs and input gradients.

    An output the rewrite no longer returns (``None`` where the original returned a tensor, such as
    the logits of the fused loss) is left out of the comparison and gets no cotangent on either side.
    """
    inputs = random_inputs(example_inputs, seed)
    new_leaves, new_out = _forward(rewritten, inputs, seed)
    ref_leaves, ref_out = _forward(original, inputs, seed)
    if len(new_out) != len(ref_out):
        return Verdict(False, float("inf"), f"{len(new_out)} outputs instead of {len(ref_out)}")
    kept = [i for i, (a, b) in enumerate(zip(new_out, ref_out)) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)]
    new_grads = _backward([new_out[i] for i in kept], new_leaves, seed)
    ref_grads = _backward([ref_out[i] for i in kept], ref_leaves, seed)
    worst, where = 0.0, "-"
    pairs = [(f"output {i}", new_out[i], ref_out[i]) for i in kept]
    pairs += [(f"grad {i}", a, b) for i, (a, b) in enumerate(zip(new_grads, ref_grads))]
    for label, a, b in pairs:
        if (a is None) != (b is None):
            return Verdict(False, float("inf"), f"{label}: one side has no value")
        if a is None:
            continue
        err = _relative_error(a, b)
        if err > TOLERANCE.get(b.dtype, 1e-4) or err != err:
            return Verdict(False, err, f"{label} ({b.dtype}, {tuple(b.shape)}): relative error {err:.2e}")
        if err >= worst:
            worst, where = err, label
    return Verdict(True, worst, f"worst relative error {worst:.1e} at {where}")


def _forward(gm: fx.GraphModule, inputs: list[Any], seed: int) -> tuple[list[Any], list[Any]]:
    # fresh leaves per run, so that neither run sees the other's gradients or in-place writes; a
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


def _backward(outputs: list[torch.Tensor], leaves: list[Any], seed: int) -> list[torch.Tensor | None]:
    diff = [o for o in outputs if o.requires_grad and o.is_floating_point()]
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in diff]
    wanted = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    if not diff or not wanted:
        return []
    return list(torch.autograd.grad(diff, wanted, cotangents, allow_unused=True))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        same_nan = torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
        return 0.0 if same_nan else float("nan")
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale > 0 else (a - b).norm().item()


def _devices(values: list[Any]) -> list[int]:
    return sorted({x.device.index or 0 for x in values if isinstance(x, torch.Tensor) and x.is_cuda})
