"""E6: the longest sequence that trains at batch 1: by bisection, or by a ladder in one process.

- **Bisection**: a probe trains a few steps at one length in its own subprocess (``python -m
  benchmarks worker ... --seq L``); it fits when the worker's row is ``ok``. Memory grows with the
  length, so "fits" is taken as monotone: the search keeps the longest length that fitted and the
  shortest that did not, and halves the gap down to ``granularity``. Each probe builds the model.
- **Ladder**: one worker builds the model once and trains two steps at each length ``lo, lo + g,
  … hi`` in turn, emptying PyTorch's cache between rungs, until one fails. A 7B build costs more
  than the steps of a short rung, so the ladder costs a build per system instead of one per
  probe. A rung follows shorter ones in the same process, so it can only find less memory than a
  fresh process would: the length it reports is never flattered.

A length counts as reached only when training steps ran at it; its tokens/s are those of the step
after the first at that length.
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
    _check_bounds(lo, hi, granularity)
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
    rows: dict[int, dict[str, Any]] = {}

    def fits(n: int) -> bool:
        rows[n] = run_probe(system, n)
        return rows[n].get("status") == "ok"

    _, probes = bisect_longest(fits, lo, hi, granularity)
    return longest_reached(system, [(n, rows[n]) for n, _ in probes], lo, hi)


def ladder_lengths(lo: int, hi: int, granularity: int) -> list[int]:
    """The rungs ``lo, lo + granularity, …, hi`` (the bounds as :func:`bisect_longest` takes them)."""
    _check_bounds(lo, hi, granularity)
    return list(range(lo, hi + 1, granularity))


def _check_bounds(lo: int, hi: int, granularity: int) -> None:
    if granularity < 1 or lo < granularity or hi < lo or lo % granularity or hi % granularity:
        raise ValueError(f"need granularity <= lo <= hi, both multiples of it; got lo={lo} hi={hi} g={granularity}")


def climb(run_rung: Callable[[int], dict[str, Any]], lengths: list[int],
          progress: Callable[[list[dict[str, Any]]], None] = lambda rungs: None) -> list[dict[str, Any]]:
    """``run_rung(seq)`` for each length in turn until one is not ``ok``; the rungs run, each its
    row with ``seq``. ``progress`` sees the rungs so far after each (a worker writes them out, so
    that a ladder stopped by its time limit keeps what it reached)."""
    rungs: list[dict[str, Any]] = []
    for n in lengths:
        rungs.append({**run_rung(n), "seq": n})
        progress(rungs)
        if rungs[-1].get("status") != "ok":
            break
    return rungs


def longest_reached(system: str, tried: list[tuple[int, dict[str, Any]]], lo: int, hi: int) -> dict[str, Any]:
    """The result of a search from the rows of the lengths tried, in order: the longest length whose
    row is ``ok``, its tokens/s and peak memory, every length tried and whether it fitted, and the
    reason the shortest failing length failed."""
    probes = [(n, row.get("status") == "ok") for n, row in tried]
    reached = [n for n, ok in probes if ok]
    out: dict[str, Any] = {"system": system, "max_seq": max(reached, default=None), "probes": probes, "lo": lo, "hi": hi}
    failures = {n: str(row.get("reason")) for n, row in tried if row.get("status") != "ok"}
    if not reached:
        out["status"], out["reason"] = "failed", failures.get(lo, "the shortest length failed")
        return out
    best = dict(tried)[out["max_seq"]]
    out["status"] = "ok"
    out["tokens_per_s"], out["peak_bytes"] = best.get("tokens_per_s"), best.get("peak_bytes")
    if failures:
        out["first_failure"] = failures[min(failures)]
    return out
