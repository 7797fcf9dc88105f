"""E6's bisection on fake "fits" predicates."""

import math

import pytest

from benchmarks.maxlen import bisect_longest, search_system


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
