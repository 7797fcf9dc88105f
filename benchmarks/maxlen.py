"""E6: the longest sequence that trains at batch 1, by bisection; each probe in its own subprocess.

A probe trains a few steps at one length (``python -m benchmarks worker ... --seq L``); it fits
when the worker's row is ``ok``. Memory grows with the length, so "fits" is taken as monotone:
the search keeps the longest length that fitted and the shortest that did not, and halves the gap
down to ``granularity``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def bisect_longest(
    fits: Callable[[int], bool], lo: int, hi: int, granularity: int = 1024
) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest multiple of ``granularity`` in ``[lo, hi]`` for which ``fits`` holds (``None``
    when ``lo`` does not fit) and the probes made, in order. ``lo`` and ``hi`` must be multiples
    of ``granularity``; ``hi`` is probed second, so a search whose top fits costs two probes."""
    if granularity < 1 or lo < granularity or hi < lo or lo % granularity or hi % granularity:
        raise ValueError(f"need granularity <= lo <= hi, both multiples of it; got lo={lo} hi={hi} g={granularity}")
    probes: list[tuple[int, bool]] = []

    def probe(n: int) -> bool:
        ok = bool(fits(n))
        probes.append((n, ok))
        return ok

    if not probe(lo):
        return None, probes
    if hi == lo or probe(hi):
        return hi, probes
    good, bad = lo, hi
    while bad - good > granularity:
        mid = (good + bad) // 2 // granularity * granularity
        if mid <= good:
            mid = good + granularity
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, probes


def search_system(
    system: str,
    run_probe: Callable[[str, int], dict[str, Any]],
    lo: int,
    hi: int,
    granularity: int,
) -> dict[str, Any]:
    """Bisection for one system; ``run_probe(system, seq)`` returns a worker row. The result gives
    the longest length that trained, and the tokens/s and peak memory of its probe."""
    reasons: dict[int, str] = {}
    rows: dict[int, dict[str, Any]] = {}

    def fits(n: int) -> bool:
        row = rows[n] = run_probe(system, n)
        if row.get("status") != "ok":
            reasons[n] = str(row.get("reason"))
        return row.get("status") == "ok"

    best, probes = bisect_longest(fits, lo, hi, granularity)
    out: dict[str, Any] = {"system": system, "max_seq": best, "probes": probes, "lo": lo, "hi": hi}
    if best is None:
        out["status"], out["reason"] = "failed", reasons.get(lo, "the shortest probe failed")
    else:
        out["status"] = "ok"
        out["tokens_per_s"], out["peak_bytes"] = rows[best].get("tokens_per_s"), rows[best].get("peak_bytes")
        if best < hi:
            out["first_failure"] = reasons.get(min((n for n, ok in probes if not ok), default=-1), "")
    return out
