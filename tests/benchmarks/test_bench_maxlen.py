"""E6's bisection on fake "fits" predicates."""

import json
import math

import pytest

from benchmarks.maxlen import bisect_longest, climb, ladder_lengths, longest_reached, search_system


@pytest.mark.parametrize("limit", [1024, 1025, 5000, 36864, 37000, 65535])
def test_bisection_finds_the_largest_fitting_multiple(limit):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= limit

    best, probes = bisect_longest(fits, 1024, 65536, 1024)
    assert best == limit // 1024 * 1024
    assert probes == [(n, n <= limit) for n in calls]
    assert len(probes) <= 2 + math.ceil(math.log2(64))


def test_bisection_edges():
    assert bisect_longest(lambda n: False, 1024, 8192, 1024) == (None, [(1024, False)])
    assert bisect_longest(lambda n: True, 1024, 8192, 1024) == (8192, [(1024, True), (8192, True)])
    with pytest.raises(ValueError):
        bisect_longest(lambda n: True, 1000, 8192, 1024)
    with pytest.raises(ValueError):
        bisect_longest(lambda n: True, 8192, 1024, 1024)


def test_search_system_reports_reasons():
    def probe(system, n):
        fits = {"status": "ok", "tokens_per_s": 1000.0 + n, "peak_bytes": 2 * n}
        return fits if n <= 3100 else {"status": "failed", "reason": "out of memory (fake)"}

    r = search_system("hf", probe, 1024, 8192, 1024)
    assert r["status"] == "ok" and r["max_seq"] == 3072
    assert (r["tokens_per_s"], r["peak_bytes"]) == (4072.0, 6144)  # the figures of the longest length's probe
    assert r["first_failure"] == "out of memory (fake)"
    r = search_system("hf", lambda s, n: {"status": "failed", "reason": "not installed: x"}, 1024, 8192, 1024)
    assert r["status"] == "failed" and r["max_seq"] is None and r["reason"] == "not installed: x"


def test_climb_stops_at_the_first_failure_and_reports_each_rung():
    seen = []

    def rung(n):
        return {"status": "ok", "tokens_per_s": float(n)} if n <= 3072 else {"status": "failed", "reason": "out of memory (fake)"}

    rungs = climb(rung, ladder_lengths(1024, 8192, 1024), lambda rs: seen.append(len(rs)))
    assert [r["seq"] for r in rungs] == [1024, 2048, 3072, 4096] and seen == [1, 2, 3, 4]
    r = longest_reached("sloth_fx", [(x["seq"], x) for x in rungs], 1024, 8192)
    assert (r["max_seq"], r["tokens_per_s"], r["first_failure"]) == (3072, 3072.0, "out of memory (fake)")
    assert r["probes"] == [(1024, True), (2048, True), (3072, True), (4096, False)]
    with pytest.raises(ValueError):
        ladder_lengths(1000, 8192, 1024)


@pytest.mark.full
def test_ladder_worker_climbs_in_one_process_on_a_tiny_model(tmp_path):
    """``maxlen --ladder`` on CPU: one worker, every rung trained (two steps each), the longest kept."""
    from benchmarks.__main__ import main

    assert main(["maxlen", "--config", "tiny", "--systems", "hf", "--lo", "32", "--hi", "96", "--granularity", "32",
                 "--ladder", "--device", "cpu", "--results", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "maxlen_tiny.json").read_text())
    assert result["status"] == "ok" and result["complete"] and result["max_seq"] == 96
    assert result["probes"] == [[32, True], [64, True], [96, True]]  # JSON: pairs as lists
    row = json.loads((tmp_path / "ladder_tiny_hf.json").read_text())
    assert [len(r["losses"]) for r in row["rungs"]] == [2, 2, 2] and all(r["tokens_per_s"] > 0 for r in row["rungs"])
