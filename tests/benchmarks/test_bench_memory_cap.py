"""The harness's memory cap (benchmarks/e2e.py): set once the system is prepared, so that it bounds
training as a smaller GPU would and not the harness's own model build (M2q builds its experts dense
on the device before quantizing them: a capped run of M2q at hf's 28 GiB died in that build on the
H100, 2026-12-07)."""

from __future__ import annotations

import types

import pytest
import torch

from benchmarks import e2e
from benchmarks.configs import get_config


def test_the_cap_is_set_after_the_model_is_prepared(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple] = []

    def prepare(system, cfg, dev, seed, **opts):
        events.append(("prepare", tuple(sorted(opts))))
        return types.SimpleNamespace()

    monkeypatch.setattr("benchmarks.systems.prepare", prepare)
    monkeypatch.setattr(e2e, "measure_matmul_rate", lambda dev: 1.0)
    monkeypatch.setattr(e2e, "cap_process_memory", lambda dev, gib: events.append(("cap", gib)) or int(gib * 2**30))
    opts = {"unsloth_offload": False, "memory_cap_gib": 28.0}
    _, setup = e2e.timed_prepare("sloth_fx", get_config("M2q"), torch.device("cpu"), 0, opts)
    assert events == [("prepare", ("unsloth_offload",)), ("cap", 28.0)]
    assert setup["memory_cap_bytes"] == 28 * 2**30
    assert opts["memory_cap_gib"] == 28.0  # the caller's options are left as they were
    events.clear()
    _, setup = e2e.timed_prepare("sloth_fx", get_config("M2q"), torch.device("cpu"), 0, {"memory_cap_gib": None})
    assert events == [("prepare", ())] and "memory_cap_bytes" not in setup
