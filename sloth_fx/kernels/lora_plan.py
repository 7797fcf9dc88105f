"""Which form each LoRA product takes, for the shapes it runs at: the cheaper by the roofline.

LoRA's two choices (:func:`lora_plan`), with ``x [T, in]``, ``W [out, in]``, ``A [r, in]``,
``B [out, r]``:

- forward:  ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` ("factored": the big product, then a rank-r update of the
  ``[T, out]`` result in place) against ``x·(W + s·B·A)ᵀ`` ("merged": first build the
  ``[out, in]`` matrix ``W + s·B·A``);
- backward: ``dY·W + s·(dY·B)·A`` against ``dY·(W + s·B·A)``.

These are the two bracketings of the adapter's chain (``(x·Aᵀ)·Bᵀ`` and ``x·(Aᵀ·Bᵀ)``, and
``(dY·B)·A`` against ``dY·(B·A)``), the second folded into the base weight's product. Each is
priced as the fused op runs it (:mod:`~sloth_fx.kernels.roofline`'s costs of its products and
passes, an accumulation in place, the fold into ``W``) beside PEFT's own order.

Training needs ``x·Aᵀ`` (for dB) and ``dY·B`` (for dA) whichever form is used. What is left to
compare is the rank-r update of the ``[T, out]`` output (factored: ``2·T·r·out`` FLOPs, a read
and a write of ``T·out`` elements) against building the merged weight (``2·out·r·in`` FLOPs, a
read and a write of ``out·in`` elements). Both have arithmetic intensity about ``r/2`` FLOP per
byte in 16-bit, far below a GPU's machine balance (~240 on an H100), so both are memory-bound
and **factored wins while T < in, merged once T > in** (and for dX: T against out). Few tokens
(decode-like shapes) favour factored; many tokens favour merged. Merged rounds ``W + s·B·A`` to
the compute dtype before the product; in 16-bit that rounding is of the order of W's own last
bit and no longer PEFT's numbers, so :func:`lora_plan` considers merged only in float32 unless
told otherwise (``allow_16bit_merge=True``); the predicted times are reported either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .roofline import DEFAULT_RATES, ZERO, Cost, DeviceRates, check_positive_int, matmul_cost, stream_cost

__all__ = ["LoRAPlan", "lora_plan"]

_FORMS = ("factored", "merged")


@dataclass(frozen=True)
class LoRAPlan:
    """Which form each LoRA product takes, with the predicted seconds of every alternative.

    ``forward`` / ``backward_dx``: ``"factored"`` or ``"merged"`` (see the module doc).
    ``predicted``: seconds per alternative: ``"forward peft"`` (PEFT's own order:
    ``xa·Bᵀ`` written out, scaled, added, as separate passes), ``"forward factored"``,
    ``"forward merged"``, and for training ``"dX peft"``, ``"dX factored"``, ``"dX merged"``
    (the part of the backward that differs: dX and the scaling of ``dY`` or ``dY·B``; ``dY·B``,
    dA and dB are common to all). ``saving_vs_peft``: predicted seconds saved per forward and
    backward against PEFT's order. ``reason``: why, in one line.

    ``LoRAPlan("merged", "factored")`` is a fixed plan (tests, or forcing a form). The plan is
    shared through the cache: treat it as read-only.
    """

    forward: str = "factored"
    backward_dx: str = "factored"
    predicted: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    saving_vs_peft: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        for attr in ("forward", "backward_dx"):
            if getattr(self, attr) not in _FORMS:
                raise ValueError(f"LoRAPlan.{attr} must be one of {_FORMS}, got {getattr(self, attr)!r}")

    def saving(self) -> float:
        """Predicted seconds saved per forward and backward against PEFT's order."""
        return self.saving_vs_peft


@lru_cache(maxsize=4096)
def lora_plan(tokens: int, in_features: int, out_features: int, rank: int, elem_bytes: int = 2,
              rates: DeviceRates = DEFAULT_RATES, *, adapter_elem_bytes: int | None = None,
              training: bool = True, allow_16bit_merge: bool = False) -> LoRAPlan:
    """The cheaper form of the forward product and of dX for one LoRA linear at these shapes.

    ``tokens`` T (all leading dims of x), ``in``/``out`` features, rank r; ``elem_bytes`` of the
    base compute dtype (2 for bf16/fp16, 4 for fp32) and ``adapter_elem_bytes`` of A and B
    (default the same; PEFT keeps fp32 adapters on a bf16 model). Charged, per form:

    forward, common: ``x·Wᵀ`` and ``xa = x·Aᵀ`` (in training; saved for dB);
      peft     ``x`` copied to the adapters' dtype when they differ, ``xa·Bᵀ`` written out, ``·s``
               and ``result + ·`` as element-wise passes, the sum cast back;
      factored ``y += s·xa·Bᵀ`` in place on the base-dtype output (reads and writes y once more;
               16-bit operands read as they are, whatever the adapters' dtype: ``lowrank_mm``);
      merged   ``W' = W + s·B·A`` in one ``addmm`` (reads W, writes W'), then ``x·W'ᵀ``; skips
               ``x·Aᵀ`` when not training.
    dX, common: ``dY·W`` (``dY·W'`` when merged);
      peft     ``dY`` copied to the adapters' dtype, ``dY·s`` over ``[T, out]``, ``(s·dY·B)·A``
               written out and cast back, then added to ``dY·W``;
      factored ``(dY·B)·s`` over ``[T, r]``, ``dX += (s·dY·B)·A`` in place;
      merged   ``(dY·B)·s`` and building ``W'`` again (never kept across the step).

    With mixed dtypes merged is never chosen: rounding ``W + s·B·A`` to the base dtype would
    drop the adapter's extra precision. In 16-bit merged is chosen only with
    ``allow_16bit_merge`` (see module doc).
    Ties go to factored. Cached per (shapes, element sizes, rates, flags): the same key returns
    the same plan object.
    """
    for name, value in (("tokens", tokens), ("in_features", in_features), ("out_features", out_features),
                        ("rank", rank), ("elem_bytes", elem_bytes)):
        check_positive_int(name, value)
    ea = elem_bytes if adapter_elem_bytes is None else adapter_elem_bytes
    check_positive_int("adapter_elem_bytes", ea)
    t, i, o, r, e = tokens, in_features, out_features, rank, elem_bytes
    es = max(e, ea)  # the sum's dtype: the wider of the two
    mixed = ea != e

    def mm(m: int, k: int, n: int, eb: int, accumulate: bool = False) -> Cost:
        return matmul_cost(m, k, n, eb, rates, accumulate=accumulate)

    def stream(elements: float, eb: float) -> Cost:
        return stream_cost(elements * eb, rates)

    base = mm(t, i, o, e)
    widen_x = stream(t * i, e + ea) if mixed else ZERO  # PEFT's x.to(adapter dtype)
    x_a = mm(t, i, r, e)  # x read in its own dtype, fp32 accumulation
    fold = mm(o, r, i, es, accumulate=True)  # W' = W + s·B·A
    forward = {
        "peft": base + widen_x + mm(t, i, r, ea) + mm(t, r, o, ea) + stream(t * o, 2 * ea)
        + stream(t * o, e + ea + es) + (stream(t * o, es + e) if es != e else ZERO),
        "factored": base + x_a + mm(t, r, o, e, accumulate=True),
        "merged": fold + base + (x_a if training else ZERO),
    }
    predicted = {f"forward {k}": v.seconds for k, v in forward.items()}
    merge_ok = not mixed and (e >= 4 or allow_16bit_merge)
    fwd = "merged" if merge_ok and forward["merged"].seconds < forward["factored"].seconds else "factored"
    bwd = "factored"
    saving = forward["peft"].seconds - forward[fwd].seconds
    if training:
        dx_base = mm(t, o, i, e)
        scale_g = stream(t * r, 2 * ea)  # (dY·B)·s, [T, r]
        dx = {
            "peft": dx_base + (stream(t * o, e + ea) if mixed else ZERO) + stream(t * o, 2 * ea) + mm(t, r, i, ea)
            + (stream(t * i, ea + e) if mixed else ZERO) + stream(t * i, 3 * e),
            "factored": dx_base + scale_g + mm(t, r, i, e, accumulate=True),
            "merged": fold + dx_base + scale_g,
        }
        predicted.update({f"dX {k}": v.seconds for k, v in dx.items()})
        bwd = "merged" if merge_ok and dx["merged"].seconds < dx["factored"].seconds else "factored"
        saving += dx["peft"].seconds - dx[bwd].seconds
    if mixed:
        reason = f"adapters of {ea} bytes over a {e}-byte base: fp32 accumulation rounded once to the base dtype; never merged"
    elif not merge_ok:
        reason = f"{e}-byte compute: merging would round W + s·B·A to 16 bits (not PEFT's numbers); factored"
    else:
        reason = f"T={t}, in={i}, out={o}, r={r}: forward {fwd}, dX {bwd} on {rates.name}"
    return LoRAPlan(fwd, bwd, predicted, saving, reason)
