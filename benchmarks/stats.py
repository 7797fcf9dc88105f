"""Statistics of the harness: medians of step times, tokens/s, loss agreement, MFU."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count); ValueError when empty."""
    if len(values) == 0:
        raise ValueError("median of no values")
    s = sorted(float(v) for v in values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def timed_steps(step_times: Sequence[float], warmup: int) -> list[float]:
    """The step times after the first ``warmup`` steps; ValueError when none remain."""
    rest = list(step_times[warmup:])
    if not rest:
        raise ValueError(f"no timed steps: {len(step_times)} steps, {warmup} of them warm-up")
    return rest


def tokens_per_second(tokens_per_step: float, step_times: Sequence[float], warmup: int) -> float:
    """Tokens of a step over the median time of the steps after warm-up."""
    return float(tokens_per_step) / median(timed_steps(step_times, warmup))


def max_relative_difference(losses: Sequence[float], reference: Sequence[float]) -> float | None:
    """Largest ``|l - r| / |r|`` over the steps both runs have (``None`` when they share none).
    A non-finite loss where the reference is finite counts as an infinite difference."""
    n = min(len(losses), len(reference))
    if n == 0:
        return None
    worst = 0.0
    for l, r in zip(losses[:n], reference[:n]):
        if not math.isfinite(l) or not math.isfinite(r):
            if not (math.isfinite(l) or math.isfinite(r)):
                continue  # both non-finite: the run agrees with hf's failure, nothing to rank
            return math.inf
        denom = abs(r) if r != 0 else 1.0
        worst = max(worst, abs(l - r) / denom)
    return worst


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: useful FLOPs per second over the measured matmul rate."""
    if step_time_s <= 0 or peak_flops_per_s <= 0:
        raise ValueError("step time and peak rate must be positive")
    return flops_per_step / step_time_s / peak_flops_per_s
