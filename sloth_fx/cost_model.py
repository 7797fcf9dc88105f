"""FLOP and byte cost of chains of matrix products, and the cheapest bracketing.

A product ``[m, k]·[k, n]`` costs ``2mkn`` FLOPs and moves at least ``(mk + kn + mn)`` elements;
on a device with matmul rate ``R`` and bandwidth ``W`` it takes about ``max(flops/R, bytes/W)``.
A chain ``M_1·M_2·…·M_n`` is bracketed by dynamic programming over sub-chains (the classic
matrix-chain order), minimising that time. LoRA's two choices are such chains:

- forward:  ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` ("factored") against ``x·(W + s·B·A)ᵀ`` ("merged", which first
  builds the [out, in] matrix ``B·A``);
- backward: ``dY·W + s·(dY·B)·A`` against ``dY·(W + s·B·A)``.

For training shapes (thousands of tokens, r ≪ in) factored wins by far; merged wins only for a
handful of tokens. Decisions are functions of the shapes, computed once per shape and cached.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class DeviceRates:
    """Matmul rate in FLOP/s and memory bandwidth in bytes/s."""

    flops: float = 7.3e14  # bf16 dense matmul measured on the H100 80GB (benchmarks, 2026-11-24)
    bandwidth: float = 3.0e12  # device-to-device copy, same run


DEFAULT_RATES = DeviceRates()


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float
    seconds: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.seconds + other.seconds)


def matmul_cost(m: int, k: int, n: int, elem_bytes: int, rates: DeviceRates = DEFAULT_RATES) -> Cost:
    flops = 2.0 * m * k * n
    moved = float(m * k + k * n + m * n) * elem_bytes
    return Cost(flops, moved, max(flops / rates.flops, moved / rates.bandwidth))


@dataclass(frozen=True)
class Bracketing:
    """The bracketing of a chain (as text, matrices named M0, M1, ...) and its cost."""

    order: str
    cost: Cost


def best_bracketing(shapes: list[tuple[int, int]], elem_bytes: int = 2,
                    rates: DeviceRates = DEFAULT_RATES) -> Bracketing:
    """The cheapest bracketing of ``M0·M1·…`` with ``Mi`` of shape ``shapes[i]`` (dynamic programming)."""
    _check_chain(shapes)
    n = len(shapes)
    best: dict[tuple[int, int], Bracketing] = {(i, i): Bracketing(f"M{i}", Cost(0, 0, 0)) for i in range(n)}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            candidates = []
            for split in range(i, j):
                left, right = best[(i, split)], best[(split + 1, j)]
                step = matmul_cost(shapes[i][0], shapes[split][1], shapes[j][1], elem_bytes, rates)
                candidates.append(Bracketing(f"({left.order}·{right.order})", left.cost + right.cost + step))
            best[(i, j)] = min(candidates, key=lambda b: b.cost.seconds)
    return best[(0, n - 1)]


def enumerate_bracketings(shapes: list[tuple[int, int]], elem_bytes: int = 2,
                          rates: DeviceRates = DEFAULT_RATES) -> list[Bracketing]:
    """Every bracketing of the chain with its cost (Catalan-many: for checks on short chains)."""
    _check_chain(shapes)

    def all_of(i: int, j: int) -> list[Bracketing]:
        if i == j:
            return [Bracketing(f"M{i}", Cost(0, 0, 0))]
        out = []
        for split in range(i, j):
            for left, right in itertools.product(all_of(i, split), all_of(split + 1, j)):
                step = matmul_cost(shapes[i][0], shapes[split][1], shapes[j][1], elem_bytes, rates)
                out.append(Bracketing(f"({left.order}·{right.order})", left.cost + right.cost + step))
        return out

    return all_of(0, len(shapes) - 1)


def _check_chain(shapes: list[tuple[int, int]]) -> None:
    if not shapes:
        raise ValueError("a chain needs at least one matrix")
    for (_, k1), (k2, _) in zip(shapes, shapes[1:]):
        if k1 != k2:
            raise ValueError(f"shapes do not chain: {shapes}")


@dataclass(frozen=True)
class LoRAPlan:
    """Which form each LoRA product takes, with the predicted seconds of every alternative."""

    forward: str
    backward_dx: str
    predicted: dict[str, float]

    def saving(self) -> float:
        """Predicted seconds saved per call against PEFT's order (factored both ways)."""
        p = self.predicted
        return p["forward factored"] + p["dX factored"] - p[f"forward {self.forward}"] - p[f"dX {self.backward_dx}"]


@lru_cache(maxsize=4096)
def lora_plan(tokens: int, in_features: int, out_features: int, rank: int, elem_bytes: int = 2,
              rates: DeviceRates = DEFAULT_RATES) -> LoRAPlan:
    """The cheaper form of the forward product and of dX for a LoRA linear at these shapes.

    Training needs ``x·Aᵀ`` (for dB) and ``dY·B`` (for dA) whatever the form, so the merged form
    pays them too; what it saves is the second pass over the [tokens, out] (or [tokens, in])
    result that the factored form's accumulation makes, and what it costs is building
    ``W + s·B·A``. Merging is only considered in float32: in 16-bit the small update would be
    rounded away against W, and the result would no longer be PEFT's.
    """
    t, i, o, r, e = tokens, in_features, out_features, rank, elem_bytes

    def stream(elements: float) -> Cost:
        return Cost(0.0, elements * e, elements * e / rates.bandwidth)

    fold = matmul_cost(o, r, i, e, rates) + stream(3.0 * o * i)  # B·A, then W + s·(B·A)
    x_a = matmul_cost(t, i, r, e, rates)
    dy_b = matmul_cost(t, o, r, e, rates)
    predicted = {
        "forward factored": (matmul_cost(t, i, o, e, rates) + x_a + matmul_cost(t, r, o, e, rates) + stream(t * o)).seconds,
        "forward merged": (fold + matmul_cost(t, i, o, e, rates) + x_a).seconds,
        "dX factored": (matmul_cost(t, o, i, e, rates) + dy_b + matmul_cost(t, r, i, e, rates) + stream(t * i)).seconds,
        "dX merged": (fold + matmul_cost(t, o, i, e, rates) + dy_b).seconds,
    }
    if e < 4:
        predicted["forward merged"] = predicted["dX merged"] = float("inf")
    forward = min(("factored", "merged"), key=lambda f: predicted[f"forward {f}"])
    backward = min(("factored", "merged"), key=lambda f: predicted[f"dX {f}"])
    return LoRAPlan(forward, backward, predicted)
