"""LoRA linears (one, or several sharing one input), with the backward written out.

PEFT computes, for each linear ``i`` reading the same ``x`` (q, k, v; or gate, up)::

    y_i = x·W_iᵀ (+ b_i) + s_i · (x·A_iᵀ)·B_iᵀ          W_i [out_i, in] frozen, A_i [r_i, in], B_i [out_i, r_i]

(``result = base_layer(x); result = result + lora_B(lora_A(dropout(x))) * scaling``, dropout the
identity; then ``result.to(torch_result_dtype)``, back to the base dtype). With ``lora_dropout > 0``
the adapters read their own input ``xd = dropout(x.to(A.dtype))``, drawn outside these ops (so the
random numbers are PEFT's, and a checkpoint's recompute replays them)::

    y = x·Wᵀ (+ b) + s · (xd·Aᵀ)·Bᵀ

one linear per op (each PEFT linear has its own dropout, its own mask: siblings share no ``xa``).
The adapters may be in another dtype than the base (PEFT's ``autocast_adapter_dtype`` keeps fp32
adapters on a bf16/fp16 model): PEFT then copies ``x`` to fp32 for their products and forms every ``[T, out]`` sum in fp32
before the cast back. These ops return the base dtype and round once, as PEFT's dense layer
does, but never materialise a wide copy: every product with the rank as a dimension goes through
:func:`~sloth_fx.kernels.lowrank_mm.lowrank_mm` (16-bit operands read as they are, fp32
accumulation, in place on the 16-bit output). Over a bitsandbytes 4-bit base PEFT rounds the
adapter term to the base dtype before the sum; here it is summed in fp32 and rounded once (one
rounding fewer, within the dtype's tolerance of PEFT's value).

How each linear's products are formed (factored, merged or stacked), what is saved for backward,
and how a bitsandbytes 4-bit base is dequantized (not from several streams at once):
:mod:`~sloth_fx.kernels.lora_function`. Each linear's form comes from
:func:`~sloth_fx.kernels.lora_forms.group_plans` for the actual shapes (cached, and recorded for
explain in the running capture's records), or from the ``plan``/``plans`` argument. Leading dims of ``x`` are flattened.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .lora_forms import group_plans, record_forms
from .lora_function import LoRAGroupFunction
from .lora_plan import LoRAPlan
from .toolkit import (
    SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, base_weight_shape, dense_weight, dtype_names, is_4bit, refusal,
    validate,
)

__all__ = [
    "lora_linear",
    "lora_linear_group",
    "lora_linear_group_reference",
    "lora_linear_group_supports",
    "lora_linear_reference",
    "lora_linear_supports",
]

# The op takes float64 too (its products then run as plain PyTorch: lowrank_mm's reference), so
# that it can be checked against float64 through itself.
_DTYPES = (*SUPPORTED_DTYPES, torch.float64)
FACTORED = LoRAPlan("factored", "factored")


# --------------------------------------------------------------------------------------------
# References: PEFT, op for op
# --------------------------------------------------------------------------------------------


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          scale: float, bias: torch.Tensor | None = None, xd: torch.Tensor | None = None) -> torch.Tensor:
    """PEFT's LoRA linear, op for op; ``xd`` (default ``x.to(A.dtype)``) is the adapters' input,
    ``dropout(x.to(A.dtype))`` in PEFT.

    Dense base (``peft.tuners.lora.layer.Linear``)::

        result = F.linear(x, W, b); (result + F.linear(F.linear(xd, A), B) * s).to(x.dtype)

    4-bit base (``peft.tuners.lora.bnb.Linear4bit``, outside autocast), the base product in
    ``x``'s dtype (bitsandbytes' compute dtype)::

        result = F.linear(x, dequant(W), b); result + (F.linear(F.linear(x.to(A.dtype), A), B) * s).to(result.dtype)
    """
    result = F.linear(x, dense_weight(weight, x.dtype), bias)
    out = F.linear(F.linear(x.to(lora_a.dtype) if xd is None else xd, lora_a), lora_b) * scale
    if is_4bit(weight):
        out = out.to(result.dtype)
    return (result + out).to(x.dtype)


def lora_linear_group_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                                lora_bs: Sequence[torch.Tensor], scales: Sequence[float],
                                biases: Sequence[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`lora_linear_reference` for each linear of a group."""
    biases = [None] * len(weights) if biases is None else biases
    return tuple(lora_linear_reference(x, w, a, b, s, bb) for w, a, b, s, bb in zip(weights, lora_as, lora_bs, scales, biases))


# --------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------


def _check_group(x, weights, lora_as, lora_bs, scales, biases) -> None:
    """Raise :class:`UnsupportedType` (dtypes) or :class:`UnsupportedValue` (counts, shapes,
    devices, scales) for arguments :func:`lora_linear_group` does not take."""
    n = len(weights)
    if n == 0 or not (len(lora_as) == len(lora_bs) == len(scales) == len(biases) == n):
        raise UnsupportedValue(
            "lora_linear", "needs one A, B, scale and bias (or None) per weight, and at least one weight"
        )
    if not isinstance(x, torch.Tensor):
        raise UnsupportedType("lora_linear", f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise UnsupportedType("lora_linear", f"x dtype {x.dtype} is not one of {dtype_names(_DTYPES)}")
    if x.dim() < 1:
        raise UnsupportedValue("lora_linear", "x must have at least one dimension (its last is the in-features)")
    in_features = x.shape[-1]
    adapter_dtypes = {t.dtype for t in (*lora_as, *lora_bs)}
    if len(adapter_dtypes) != 1:
        raise UnsupportedType("lora_linear", "all adapters (A and B) of a group must share one dtype, "
                                             f"got {sorted(map(str, adapter_dtypes))}")
    if next(iter(adapter_dtypes)) not in _DTYPES:
        raise UnsupportedType(
            "lora_linear", f"adapter dtype {next(iter(adapter_dtypes))} is not one of {dtype_names(_DTYPES)}"
        )
    for i, (w, a, b, s, bias) in enumerate(zip(weights, lora_as, lora_bs, scales, biases)):
        shape = base_weight_shape(w)
        if len(shape) != 2:
            raise UnsupportedValue(
                "lora_linear", f"weight {i} has shape {shape}; the base weight must be 2-D [out, in]"
            )
        if is_4bit(w):
            if w.requires_grad:
                raise UnsupportedValue(
                    "lora_linear", f"4-bit weight {i} requires grad; a quantized base cannot be trained"
                )
        elif w.dtype != x.dtype:
            raise UnsupportedType(
                "lora_linear", f"weight {i} is {w.dtype} but x is {x.dtype}; the base product needs them alike"
            )
        out_features, w_in = shape
        if a.dim() != 2 or b.dim() != 2:
            raise UnsupportedValue("lora_linear", f"linear {i}: A {tuple(a.shape)} and B {tuple(b.shape)} must be 2-D")
        if w_in != in_features or a.shape[1] != in_features or b.shape[1] != a.shape[0] or b.shape[0] != out_features:
            raise UnsupportedValue("lora_linear", f"shapes do not chain: x {tuple(x.shape)}, W {shape}, "
                                                  f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
            raise UnsupportedValue("lora_linear", f"bias {i} must be [{out_features}] in {x.dtype}, "
                                                  f"got {tuple(bias.shape)} {bias.dtype}")
        for name, t in (("weight", w), ("A", a), ("B", b), ("bias", bias)):
            if t is not None and t.device != x.device:
                raise UnsupportedValue("lora_linear", f"{name} {i} is on {t.device} but x is on {x.device}")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
            raise UnsupportedValue("lora_linear", f"scale {i} must be a finite number, got {s!r}")


def _check_xd(x: torch.Tensor, lora_a: torch.Tensor, xd: torch.Tensor) -> None:
    """Raise :class:`UnsupportedValue` unless ``xd`` can be the adapters' input beside ``x``."""
    if not isinstance(xd, torch.Tensor) or xd.shape != x.shape or xd.dtype != lora_a.dtype or xd.device != x.device:
        raise UnsupportedValue("lora_linear", f"xd must be a tensor of x's shape {tuple(x.shape)} in the adapters' "
                                              f"dtype {lora_a.dtype} on {x.device}, got "
                                              f"{getattr(xd, 'shape', type(xd).__name__)} {getattr(xd, 'dtype', '')}")


def _check_single(x, weight, lora_a, lora_b, scale, bias, xd) -> None:
    _check_group(x, [weight], [lora_a], [lora_b], [scale], [bias])
    if xd is not None:
        _check_xd(x, lora_a, xd)


def lora_linear_group_supports(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                               lora_bs: Sequence[torch.Tensor], scales: Sequence[float],
                               biases: Sequence[torch.Tensor | None] | None = None) -> str | None:
    """None when :func:`lora_linear_group` takes these arguments, else the reason it does not.

    The checks it raises on (counts, dtypes, shapes, devices, scales), answered instead of
    raised; they read no tensor's values, so fake tensors (an fx node's example value) do. A
    4-bit base weight is asked about as itself (the live ``Params4bit``: its quant state holds
    its ``[out, in]``), since a fake copy of its packed storage has lost that state.
    """
    biases = [None] * len(weights) if biases is None else list(biases)
    return refusal(_check_group, x, weights, lora_as, lora_bs, scales, biases)


def lora_linear_supports(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         scale: float, bias: torch.Tensor | None = None, *,
                         xd: torch.Tensor | None = None) -> str | None:
    """None when :func:`lora_linear` takes these arguments, else the reason it does not: as
    :func:`lora_linear_group_supports` for one linear, and ``xd`` (when given) of ``x``'s shape
    in the adapters' dtype."""
    return refusal(_check_single, x, weight, lora_a, lora_b, scale, bias, xd)


# Argument signatures that passed _check_group, which reads nothing else of its arguments: a
# signature seen before skips the checks. No token count in it (only x's last dim), so ragged
# batches add no entries.
_VALID: set[tuple] = set()


def _signature(x, weights, lora_as, lora_bs, scales, biases) -> tuple:
    return (len(weights), len(lora_as), len(lora_bs), len(scales), len(biases),
            type(x), x.dtype, x.shape[-1:], x.device,
            *[(type(w), base_weight_shape(w), w.dtype, w.device, w.requires_grad) for w in weights],
            *[(type(t), t.shape, t.dtype, t.device) for t in (*lora_as, *lora_bs)],
            *[None if t is None else (type(t), t.shape, t.dtype, t.device) for t in biases],
            *[(type(s), s) for s in scales])


def lora_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor],
                      lora_bs: Sequence[torch.Tensor], scales: Sequence[float],
                      biases: Sequence[torch.Tensor | None] | None = None, *,
                      plans: Sequence[LoRAPlan] | None = None) -> tuple[torch.Tensor, ...]:
    """The outputs ``y_i = x·W_iᵀ (+ b_i) + s_i·(x·A_iᵀ)·B_iᵀ`` of LoRA linears reading one ``x``.

    ``x [..., in]``; ``weights[i]`` dense ``[out_i, in]`` in x's dtype, or a bitsandbytes 4-bit
    weight of that shape; ``lora_as[i] [r_i, in]``, ``lora_bs[i] [out_i, r_i]``, all in one dtype;
    ``biases[i]`` None or ``[out_i]`` in x's dtype; ``scales[i]`` a float. Outputs ``[..., out_i]``
    in x's dtype: see the module doc for the rounding. ``plans`` (one per linear) fixes the forms;
    by default they come from :func:`~sloth_fx.kernels.lora_forms.group_plans` for the actual
    shapes and the device's measured rates (and are recorded for explain: ``record_forms``). Bad inputs raise ``TypeError`` (dtypes) or
    ``ValueError`` (shapes, devices, counts).

    Host cost: the checks run once per signature of the arguments (dtypes, shapes but the token
    count, devices, scales) and the plans once per (token count, shapes, dtypes, device,
    training); nothing is cached of the tensors' values.
    """
    n = len(weights)
    biases = list(biases) if biases is not None else [None] * n
    validate(_VALID, _signature, _check_group, x, weights, lora_as, lora_bs, scales, biases)
    if plans is None:
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *lora_as, *lora_bs))
        tokens = max(1, x.numel() // max(1, x.shape[-1]))
        shape = (x.shape[-1], tuple(base_weight_shape(w)[0] for w in weights), tuple(a.shape[0] for a in lora_as),
                 x.dtype, lora_as[0].dtype, tuple(is_4bit(w) for w in weights), training)
        plans = group_plans(tokens, shape, x.device)
        record_forms(tokens, shape, plans)
    else:
        plans = tuple(plans)
        if len(plans) != n or not all(isinstance(p, LoRAPlan) for p in plans):
            raise ValueError(f"plans must be {n} LoRAPlan objects, one per linear")
    return LoRAGroupFunction.apply(x, None, tuple(float(s) for s in scales), plans, n,
                                   *weights, *lora_as, *lora_bs, *biases)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None, *, plan: LoRAPlan | None = None,
                xd: torch.Tensor | None = None) -> torch.Tensor:
    """One LoRA linear: ``x·Wᵀ (+ b) + s·(xd·Aᵀ)·Bᵀ``, with ``xd = x`` by default.

    Without ``xd``: :func:`lora_linear_group` with one member. ``xd`` is the adapters' own input,
    ``x``'s shape in the adapters' dtype: PEFT's ``dropout(x.to(A.dtype))``, drawn outside the op
    so that its random numbers are PEFT's. Then ``dX = dY·W`` (base path only) and
    ``d(xd) = s·dY·B·A``, ``dA = (s·dY·B)ᵀ·xd``; both products are factored (``x`` and ``xd``
    differ, so ``W + s·B·A`` does not apply): a ``plan`` must be ``LoRAPlan("factored", "factored")``.
    """
    if xd is None:
        return lora_linear_group(x, [weight], [lora_a], [lora_b], [scale], [bias],
                                 plans=None if plan is None else [plan])[0]
    validate(_VALID, _signature, _check_group, x, [weight], [lora_a], [lora_b], [scale], [bias])
    _check_xd(x, lora_a, xd)
    if plan is not None and (plan.forward, plan.backward_dx) != ("factored", "factored"):
        raise ValueError(f"with xd both products are factored; got plan {plan.forward}/{plan.backward_dx}")
    return LoRAGroupFunction.apply(x, xd, (float(scale),), (FACTORED,), 1, weight, lora_a, lora_b, bias)[0]
