"""Which form each LoRA product takes, for the shapes it runs at: the cheapest by the roofline.

LoRA's three forms (:func:`lora_plan`), with ``x [T, in]``, ``W [out, in]``, ``A [r, in]``,
``B [out, r]``:

- forward:  ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` ("factored": the big product, then a rank-r update of the
  ``[T, out]`` result in place), ``x·(W + s·B·A)ᵀ`` ("merged": first build the ``[out, in]``
  matrix ``W + s·B·A``), ``x·[W; A]ᵀ`` ("stacked": ``x·Aᵀ`` as ``r`` more columns of the base
  product, then factored's update);
- backward: ``dY·W + s·(dY·B)·A``, ``dY·(W + s·B·A)``, ``dY·[W | B]`` ("stacked": ``dY·B`` as
  ``r`` more columns of the base product, then factored's ``dX += s·(dY·B)·A``).

Factored and merged are the two bracketings of the adapter's chain (``(x·Aᵀ)·Bᵀ`` and
``x·(Aᵀ·Bᵀ)``, ``(dY·B)·A`` and ``dY·(B·A)``), the second folded into the base weight's product.
Stacked keeps factored's bracketing and moves the thin product into the base GEMM, which reads
``x`` (``dY``) anyway. Each form is priced as the fused op runs it (:mod:`~sloth_fx.kernels.roofline`'s
costs of its products and passes) beside PEFT's own order.

Factored against merged: training needs ``x·Aᵀ`` (for dB) and ``dY·B`` (for dA) either way, so
what differs is the rank-r update of the ``[T, out]`` output (``2·T·r·out`` FLOPs, a read and a
write of ``T·out`` elements) against building the merged weight (``2·out·r·in`` FLOPs, a read and
a write of ``out·in`` elements). Both have arithmetic intensity about ``r/2`` FLOP per byte in
16-bit, far below a GPU's machine balance (~240 on an H100), so both are memory-bound and
**factored wins while T < in, merged once T > in** (and for dX: T against out).

Stacked against factored (what stacked runs: :mod:`~sloth_fx.kernels.lora_stack`). The base
GEMMs are compute-bound, the thin products memory-bound, so stacking trades bytes for FLOPs:

- forward: it saves the read of ``x`` by ``x·Aᵀ`` (``T·in`` elements; siblings read ``x`` once
  for all their adapters, so each is credited its share, and a group stacks all its forwards or
  none: :func:`~sloth_fx.kernels.lora_forms.group_plans`). It costs a copy of ``y`` out of the
  ``[T, out + r]`` result (``2·T·out``), a further tile column of the GEMM (cuBLAS computes
  whole tiles: ``out + r`` columns cost ``out + 128``, ~3% more FLOPs at out = 4096) and, over
  a dense base, a copy of ``W`` into the stacked buffer (``2·out·in``; a 4-bit ``W`` is
  dequantized straight into it, as it is dequantized anyway). Only a linear with ``in`` well
  above ``2·out`` can gain (down_proj over a 4-bit base, 22 µs of 2.2 ms before the tile column,
  which takes it back at T = 16384 on an H100);
- dX: it saves the read of ``dY`` by ``dY·B`` (``T·out``) and costs a copy of ``W`` into
  ``[out, in + r]`` (``2·out·in``, over a 4-bit base too: bitsandbytes dequantizes only into a
  contiguous buffer) and the tile column: a near tie at T = 16384 and in = 4096 (predicted 890
  against factored's 888 µs on an H100), a gain from about ``4.4·in`` tokens. dX is left a view of
  the result: no copy.

A stacked copy of ``W`` kept from call to call instead would drop the copy of ``W``: priced as
``"forward stacked-kept"`` and ``"dX stacked-kept"`` over a dense base, never chosen (not built),
because it holds a second and a third copy of every adapted weight (``[W; A]`` and ``[W | B]``,
``2·out·in`` elements a linear: 26 GB for Llama-2-7B in bf16), memory the activations need.

Rounding: merged rounds ``W + s·B·A`` to the compute dtype before the product; in 16-bit that
rounding is of the order of W's own last bit and no longer PEFT's numbers, so :func:`lora_plan`
considers merged only in float32 unless told otherwise (``allow_16bit_merge=True``). Stacked
computes ``x·Aᵀ`` and ``dY·B`` from A and B in the compute dtype, rounded to it: PEFT's own
arithmetic when the adapters are in the compute dtype, but with fp32 adapters on a 16-bit base
(PEFT's default) PEFT forms them in fp32, and stacking would round A, B and both products to
16 bits. So stacked is considered only when the adapters are in the compute dtype, unless told
otherwise (``allow_rounded_adapters=True``). The predicted times are reported either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .roofline import (
    DEFAULT_RATES, ZERO, Cost, DeviceRates, check_positive_int, matmul_cost, roofline_cost, stream_cost,
)

__all__ = ["FORMS", "LoRAPlan", "lora_plan"]

FORMS = ("factored", "merged", "stacked")
_TILE = 128  # the narrowest output tile of cuBLAS's bf16 GEMMs on an H100


@dataclass(frozen=True)
class LoRAPlan:
    """Which form each LoRA product takes, with the predicted seconds of every alternative.

    ``forward`` / ``backward_dx``: one of :data:`FORMS` (see the module doc). ``predicted``:
    seconds per alternative: ``"forward peft"`` (PEFT's own order: ``xa·Bᵀ`` written out, scaled,
    added, as separate passes), ``"forward factored"``, ``"forward merged"``, ``"forward stacked"``
    (and ``"forward stacked-kept"`` over a dense base), and for training the same for ``"dX …"``
    (the part of the backward that differs: dX, ``dY·B`` and the scaling of ``dY`` or ``dY·B``;
    dA and dB are common to all). ``saving_vs_peft``: predicted seconds saved per forward and
    backward against PEFT's order. ``reason``: why, in one line.

    ``LoRAPlan("merged", "stacked")`` is a fixed plan (tests, or forcing a form: a forced stacked
    plan stacks fp32 adapters too, rounded). The plan is shared through the cache: treat it as
    read-only.
    """

    forward: str = "factored"
    backward_dx: str = "factored"
    predicted: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    saving_vs_peft: float = 0.0
    reason: str = ""

    def __post_init__(self) -> None:
        for attr in ("forward", "backward_dx"):
            if getattr(self, attr) not in FORMS:
                raise ValueError(f"LoRAPlan.{attr} must be one of {FORMS}, got {getattr(self, attr)!r}")

    def saving(self) -> float:
        """Predicted seconds saved per forward and backward against PEFT's order."""
        return self.saving_vs_peft


@lru_cache(maxsize=4096)
def lora_plan(tokens: int, in_features: int, out_features: int, rank: int, elem_bytes: int = 2,
              rates: DeviceRates = DEFAULT_RATES, *, adapter_elem_bytes: int | None = None,
              training: bool = True, allow_16bit_merge: bool = False, allow_rounded_adapters: bool = False,
              siblings: int = 1, base_4bit: bool = False, stack_forward: bool = True) -> LoRAPlan:
    """The cheapest allowed form of the forward product and of dX for one LoRA linear at these shapes.

    ``tokens`` T (all leading dims of x), ``in``/``out`` features, rank r; ``elem_bytes`` of the
    base compute dtype (2 for bf16/fp16, 4 for fp32) and ``adapter_elem_bytes`` of A and B
    (default the same; PEFT keeps fp32 adapters on a bf16 model); ``siblings``: the linears of
    its group, which read ``x`` once for all their ``x·Aᵀ``; ``base_4bit``: W is dequantized
    every call; ``stack_forward`` False leaves stacked out of the forward's candidates (its group
    does not stack every sibling). Charged, per form:

    forward, common: ``x·Wᵀ`` and, in training, ``xa = x·Aᵀ`` (saved for dB) with its share of
    the read of x;
      peft     ``x`` copied to the adapters' dtype when they differ, ``xa·Bᵀ`` written out, ``·s``
               and ``result + ·`` as element-wise passes, the sum cast back;
      factored ``y += s·xa·Bᵀ`` in place on the base-dtype output (reads and writes y once more;
               16-bit operands read as they are, whatever the adapters' dtype: ``lowrank_mm``);
      merged   ``W' = W + s·B·A`` in one ``addmm`` (reads W, writes W'), then ``x·W'ᵀ``; skips
               ``x·Aᵀ`` when not training;
      stacked  W (dense base) and A copied into ``[W; A]``, ``x·[W; A]ᵀ`` instead of ``x·Wᵀ`` and
               ``x·Aᵀ``, y copied out of it, xa widened to fp32, then factored's update.
    dX, common: ``dY·W`` (``dY·W'`` when merged);
      peft     ``dY`` copied to the adapters' dtype, ``dY·s`` over ``[T, out]``, ``(s·dY)·B``,
               ``(s·dY·B)·A`` written out and cast back, then added to ``dY·W``;
      factored ``dY·B``, ``·s`` over ``[T, r]``, ``dX += (s·dY·B)·A`` in place;
      merged   ``dY·B``, ``·s`` and building ``W'`` again (never kept across the step);
      stacked  W and B copied into ``[W | B]``, ``dY·[W | B]`` instead of ``dY·W`` and ``dY·B``,
               ``dY·B`` widened and scaled, then factored's ``dX += g·A``.

    With mixed dtypes merged is never chosen: rounding ``W + s·B·A`` to the base dtype would
    drop the adapter's extra precision; nor stacked unless ``allow_rounded_adapters``. In 16-bit
    merged is chosen only with ``allow_16bit_merge`` (see module doc). Ties go to factored, then
    merged. Cached per (shapes, element sizes, rates, flags): the same key returns the same plan
    object.
    """
    for name, value in (("tokens", tokens), ("in_features", in_features), ("out_features", out_features),
                        ("rank", rank), ("elem_bytes", elem_bytes), ("siblings", siblings)):
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

    base = mm(t, i, _tiled(o), e)
    widen_x = stream(t * i, e + ea) if mixed else ZERO  # PEFT's x.to(adapter dtype)
    # x read in its own dtype, once for the group: this linear's share
    x_a = roofline_cost(2 * t * i * r, (t * i / siblings + i * r + t * r) * e, e, rates)
    fold = mm(o, r, i, es, accumulate=True)  # W' = W + s·B·A
    update = mm(t, r, o, e, accumulate=True)  # y += s·xa·Bᵀ
    copy_w = stream(o * i, 2 * e)  # W into a stacked buffer (a dense W, or a dequantized one into [W | B])
    widen_thin = stream(t * r, e + 4)  # the stacked product's r columns into the fp32 xa (or g)
    forward = {
        "peft": base + widen_x + mm(t, i, r, ea) + mm(t, r, o, ea) + stream(t * o, 2 * ea)
        + stream(t * o, e + ea + es) + (stream(t * o, es + e) if es != e else ZERO),
        "factored": base + x_a + update,
        "merged": fold + base + (x_a if training else ZERO),
    }
    stacked_fwd = stream(r * i, ea + e) + mm(t, i, _tiled(o + r), e) + stream(t * o, 2 * e) + widen_thin + update
    forward["stacked"] = stacked_fwd + (ZERO if base_4bit else copy_w)
    if not base_4bit:
        forward["stacked-kept"] = stacked_fwd
    predicted = {f"forward {k}": v.seconds for k, v in forward.items()}
    merge_ok = not mixed and (e >= 4 or allow_16bit_merge)
    stack_ok = not mixed or allow_rounded_adapters
    allowed = ["factored", *(["merged"] if merge_ok else []), *(["stacked"] if stack_ok else [])]
    fwd = min([f for f in allowed if f != "stacked" or stack_forward], key=lambda f: forward[f].seconds)
    bwd = "factored"
    saving = forward["peft"].seconds - forward[fwd].seconds
    if training:
        dx_base = mm(t, o, _tiled(i), e)
        dy_b = mm(t, o, r, e)  # dY read in its own dtype, fp32 accumulation
        scale_g = stream(t * r, 2 * ea)  # (dY·B)·s, [T, r]
        lora_dx = mm(t, r, i, e, accumulate=True)  # dX += g·A
        dx = {
            "peft": dx_base + (stream(t * o, e + ea) if mixed else ZERO) + stream(t * o, 2 * ea) + mm(t, o, r, ea)
            + mm(t, r, i, ea) + (stream(t * i, ea + e) if mixed else ZERO) + stream(t * i, 3 * e),
            "factored": dx_base + dy_b + scale_g + lora_dx,
            "merged": fold + dx_base + dy_b + scale_g,
        }
        stacked_dx = stream(o * r, ea + e) + mm(t, o, _tiled(i + r), e) + widen_thin + stream(t * r, 8) + lora_dx
        dx["stacked"] = stacked_dx + copy_w
        if not base_4bit:
            dx["stacked-kept"] = stacked_dx
        predicted.update({f"dX {k}": v.seconds for k, v in dx.items()})
        bwd = min(allowed, key=lambda f: dx[f].seconds)
        saving += dx["peft"].seconds - dx[bwd].seconds
    return LoRAPlan(fwd, bwd, predicted, saving, _reason(t, i, o, r, e, ea, fwd, bwd, allowed, rates))


def _tiled(n: int) -> int:
    """The columns a cuBLAS product computes for ``n``: whole tiles, 128 wide at the least, so
    ``out + r`` columns cost a tile column more than ``out`` (the GEMM's extra FLOPs, ~3% at
    out = 4096, are most of what stacking costs at large T)."""
    return -(-n // _TILE) * _TILE


def _reason(t: int, i: int, o: int, r: int, e: int, ea: int, fwd: str, bwd: str, allowed: list[str],
            rates: DeviceRates) -> str:
    """Why these forms: what was not allowed and why, then the pick among the rest."""
    why = []
    if ea != e:
        why.append(f"adapters of {ea} bytes over a {e}-byte base: fp32 accumulation rounded once to the base dtype; "
                   "never merged")
        if "stacked" not in allowed:
            why.append("not stacked (the base GEMM would round A, B, x·Aᵀ and dY·B to the base dtype)")
    elif "merged" not in allowed:
        why.append(f"{e}-byte compute: merging would round W + s·B·A to 16 bits (not PEFT's numbers); not merged")
    why.append(f"T={t}, in={i}, out={o}, r={r}: forward {fwd}, dX {bwd}, the cheapest of {'/'.join(allowed)} "
               f"on {rates.name}")
    return "; ".join(why)
