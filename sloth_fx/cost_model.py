"""FLOP and byte cost of chains of matrix products, the cheapest bracketing, and LoRA's choices.

A product ``[m, k]·[k, n]`` costs ``2mkn`` FLOPs and moves at least ``(mk + kn + mn)`` elements
(``+ mn`` when it accumulates into its output, ``C += A·B``, which reads C too); on a device
with matmul rate ``R`` and bandwidth ``W`` it takes about ``max(flops/R, bytes/W)`` (a
roofline: bound by whichever resource it exhausts first). An element-wise pass over ``b`` bytes
(reads plus writes) takes ``b/W``. The rates are a :class:`DeviceRates`: measured on the current
CUDA device by :func:`measure_device_rates`, or the H100 default.

A chain ``M_0·M_1·…·M_{n-1}`` is bracketed by dynamic programming over sub-chains (the classic
matrix-chain order), minimising that time (:func:`best_bracketing`); :func:`enumerate_bracketings`
lists every bracketing with its cost, to check it by brute force.

LoRA's two choices (:func:`lora_plan`), with ``x [T, in]``, ``W [out, in]``, ``A [r, in]``,
``B [out, r]``:

- forward:  ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` ("factored": the big product, then a rank-r update of the
  ``[T, out]`` result in place) against ``x·(W + s·B·A)ᵀ`` ("merged": first build the
  ``[out, in]`` matrix ``W + s·B·A``);
- backward: ``dY·W + s·(dY·B)·A`` against ``dY·(W + s·B·A)``.

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

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Union

import torch

__all__ = [
    "DEFAULT_RATES",
    "Bracketing",
    "Cost",
    "DeviceRates",
    "LoRAPlan",
    "best_bracketing",
    "enumerate_bracketings",
    "lora_plan",
    "matmul_cost",
    "measure_device_rates",
    "stream_cost",
]


# --------------------------------------------------------------------------------------------
# Device rates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceRates:
    """What one device sustains: 16-bit matmul rate (FLOP/s), memory bandwidth (bytes/s, reads
    plus writes of a large copy), and the fp32 matmul rate (FLOP/s, under the process's TF32
    setting when measured)."""

    flops: float = 7.3e14  # bf16 dense matmul measured on the H100 80GB (benchmarks, 2026-11-24)
    bandwidth: float = 3.0e12  # device-to-device copy, same run
    flops_fp32: float = 5.0e13  # H100 SXM fp32 without TF32: ~75% of the 67 TFLOP/s peak
    name: str = "H100 80GB (default)"

    def __post_init__(self) -> None:
        for attr in ("flops", "bandwidth", "flops_fp32"):
            value = getattr(self, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DeviceRates.{attr} must be a positive finite number, got {value!r}")

    def matmul_rate(self, elem_bytes: int) -> float:
        """The matmul rate for elements of ``elem_bytes`` bytes: 16-bit (<= 2) or fp32."""
        return self.flops if elem_bytes <= 2 else self.flops_fp32


DEFAULT_RATES = DeviceRates()


def _median_cuda_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 3) -> float:
    """Median over ``reps`` runs of ``fn``, each timed with a pair of CUDA events (ms)."""
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


@lru_cache(maxsize=None)
def _measure_cuda(index: int) -> DeviceRates:
    device = torch.device("cuda", index)
    # autocast would turn the fp32 product into a bf16 one; no graph is wanted either
    with torch.cuda.device(device), torch.autocast("cuda", enabled=False), torch.no_grad():
        # 4096³ bf16: 137 GFLOP a product, on the GEMM plateau, in 3 x 32 MiB of memory.
        n = 4096
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        ms16 = _median_cuda_ms(lambda: torch.mm(a, b, out=c))
        # fp32 is ~15x slower: 2048³ keeps the measurement short.
        n32 = 2048
        a, b = (torch.randn(n32, n32, device=device) for _ in range(2))
        c = torch.empty(n32, n32, device=device)
        ms32 = _median_cuda_ms(lambda: torch.mm(a, b, out=c))
        del a, b, c
        # 256 MiB: far beyond the L2 cache (50 MiB on an H100), so this is DRAM bandwidth.
        nbytes = 256 * 2**20
        src = torch.empty(nbytes, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms_copy = _median_cuda_ms(lambda: dst.copy_(src))
        del src, dst
        name = torch.cuda.get_device_name(device)
    return DeviceRates(
        flops=2.0 * n**3 / (ms16 * 1e-3),
        bandwidth=2.0 * nbytes / (ms_copy * 1e-3),  # every byte read once and written once
        flops_fp32=2.0 * n32**3 / (ms32 * 1e-3),
        name=f"{name} (measured)",
    )


def measure_device_rates(device: torch.device | str | int | None = None) -> DeviceRates:
    """The matmul rates and memory bandwidth of a CUDA device, measured once per device.

    A 4096³ bf16 product, a 2048³ fp32 product and a 256 MiB device copy, each the median of 10
    runs timed with CUDA events after 3 warm-up runs. Not on CPU: there (or without CUDA, or if
    the measurement runs out of memory) it returns :data:`DEFAULT_RATES` without measuring.
    Cached per device index.
    """
    if device is None:
        if not torch.cuda.is_available():
            return DEFAULT_RATES
        device = torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_RATES
    try:
        return _measure_cuda(device.index if device.index is not None else torch.cuda.current_device())
    except torch.cuda.OutOfMemoryError:
        return DEFAULT_RATES


# --------------------------------------------------------------------------------------------
# One product, one element-wise pass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """FLOPs, bytes moved and estimated seconds; costs add."""

    flops: float
    bytes: float
    seconds: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.seconds + other.seconds)


ZERO = Cost(0.0, 0.0, 0.0)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def matmul_cost(m: int, k: int, n: int, elem_bytes: int, rates: DeviceRates = DEFAULT_RATES, *,
                accumulate: bool = False) -> Cost:
    """``[m, k]·[k, n]``: ``2mkn`` FLOPs, ``(mk + kn + mn)·elem_bytes`` bytes (``+ mn·elem_bytes``
    when ``accumulate``: ``C += A·B`` reads C), ``max(flops / rate, bytes / bandwidth)`` seconds."""
    for name, value in (("m", m), ("k", k), ("n", n), ("elem_bytes", elem_bytes)):
        _check_positive_int(name, value)
    flops = 2.0 * m * k * n
    moved = float(m * k + k * n + m * n * (2 if accumulate else 1)) * elem_bytes
    return Cost(flops, moved, max(flops / rates.matmul_rate(elem_bytes), moved / rates.bandwidth))


def stream_cost(nbytes: float, rates: DeviceRates = DEFAULT_RATES) -> Cost:
    """A memory-bound element-wise pass reading plus writing ``nbytes`` in all."""
    return Cost(0.0, float(nbytes), nbytes / rates.bandwidth)


# --------------------------------------------------------------------------------------------
# Chains
# --------------------------------------------------------------------------------------------

#: A bracketing tree: a leaf is the index of a matrix in the chain, a product a pair of trees.
Tree = Union[int, tuple["Tree", "Tree"]]


@dataclass(frozen=True)
class Bracketing:
    """One evaluation order of a chain and its cost.

    ``order``: the bracketing as text, every product parenthesised: ``((x·A)·B)`` (matrices
    named ``M0, M1, …`` unless names were given). ``cost``: totals over its products.
    ``tree``: the same as nested pairs of leaf indices, ``((0, 1), 2)``.
    """

    order: str
    cost: Cost
    tree: Tree = 0

    def __str__(self) -> str:
        return self.order


def _check_chain(shapes: Sequence[tuple[int, int]], names: Sequence[str] | None) -> list[str]:
    if not shapes:
        raise ValueError("a chain needs at least one matrix")
    for i, shape in enumerate(shapes):
        if len(shape) != 2:
            raise ValueError(f"matrix {i} has shape {tuple(shape)}; a chain is of 2-D matrices")
        _check_positive_int(f"shapes[{i}][0]", shape[0])
        _check_positive_int(f"shapes[{i}][1]", shape[1])
    for (_, k1), (k2, _) in zip(shapes, shapes[1:]):
        if k1 != k2:
            raise ValueError(f"shapes do not chain: {list(shapes)}")
    if names is None:
        return [f"M{i}" for i in range(len(shapes))]
    if len(names) != len(shapes):
        raise ValueError(f"{len(names)} names for {len(shapes)} matrices")
    return list(names)


def best_bracketing(shapes: Sequence[tuple[int, int]], elem_bytes: int = 2, rates: DeviceRates = DEFAULT_RATES,
                    names: Sequence[str] | None = None) -> Bracketing:
    """The cheapest bracketing of ``M0·M1·…`` with ``Mi`` of shape ``shapes[i]``.

    Dynamic programming: with ``C(i, j)`` the least time of the sub-chain ``Mi…Mj``,
    ``C(i, i) = 0`` and ``C(i, j) = min over i <= k < j of C(i, k) + C(k+1, j) + t(rows_i, cols_k, cols_j)``.
    A tree's cost is the sum of its products' costs and each product's cost depends only on its
    three dimensions, so optimal sub-chains compose into an optimal chain: O(n³). The returned
    FLOPs and bytes are those of the chosen order. Ties go to the first split.
    """
    labels = _check_chain(shapes, names)
    n = len(shapes)
    best: dict[tuple[int, int], Bracketing] = {(i, i): Bracketing(labels[i], ZERO, i) for i in range(n)}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            candidates = []
            for split in range(i, j):
                left, right = best[(i, split)], best[(split + 1, j)]
                step = matmul_cost(shapes[i][0], shapes[split][1], shapes[j][1], elem_bytes, rates)
                candidates.append(Bracketing(f"({left.order}·{right.order})", left.cost + right.cost + step,
                                             (left.tree, right.tree)))
            best[(i, j)] = min(candidates, key=lambda b: b.cost.seconds)
    return best[(0, n - 1)]


def enumerate_bracketings(shapes: Sequence[tuple[int, int]], elem_bytes: int = 2,
                          rates: DeviceRates = DEFAULT_RATES, names: Sequence[str] | None = None) -> list[Bracketing]:
    """Every bracketing of the chain with its cost: Catalan(n-1) of them (1, 1, 2, 5, 14, 42,
    132, …), for brute-force checks on short chains."""
    labels = _check_chain(shapes, names)

    def all_of(i: int, j: int) -> list[Bracketing]:
        if i == j:
            return [Bracketing(labels[i], ZERO, i)]
        out = []
        for split in range(i, j):
            step = matmul_cost(shapes[i][0], shapes[split][1], shapes[j][1], elem_bytes, rates)
            for left, right in itertools.product(all_of(i, split), all_of(split + 1, j)):
                out.append(Bracketing(f"({left.order}·{right.order})", left.cost + right.cost + step,
                                      (left.tree, right.tree)))
        return out

    return all_of(0, len(shapes) - 1)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

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
        _check_positive_int(name, value)
    ea = elem_bytes if adapter_elem_bytes is None else adapter_elem_bytes
    _check_positive_int("adapter_elem_bytes", ea)
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
