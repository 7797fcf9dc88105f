"""The profile's arithmetic on the GPU's idle time (made-up intervals, in microseconds) and the step
loop's phase labels as the profiler records them (CPU)."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from benchmarks.data import Batch
from benchmarks.e2e import PHASE_LABEL, train_steps
from benchmarks.profile import BETWEEN, idle_by_phase, merged, phase_spans


def test_merged_joins_overlapping_and_nested_spans():
    assert merged([(20, 30), (0, 10), (5, 15), (6, 7), (15, 16)]) == [(0, 16), (20, 30)]
    assert merged([]) == []


def test_idle_time_goes_to_the_phase_the_host_was_in():
    kernels = [(0, 10), (5, 15), (20, 30)]
    phases = [("forward", 0, 12), ("backward", 12, 25), ("optimizer", 25, 40)]
    idle = idle_by_phase(kernels, phases)
    # gaps: 15-20 (backward), 30-40 (optimizer, to the window's end)
    assert idle == pytest.approx({"forward": 0.0, "backward": 5e-6, "optimizer": 10e-6, BETWEEN: 0.0})


def test_a_gap_over_several_phases_is_split_and_the_rest_is_between_them():
    kernels = [(0, 5), (25, 30), (45, 60)]
    phases = [("forward", 0, 10), ("backward", 20, 30), ("forward", 40, 50)]
    idle = idle_by_phase(kernels, phases)
    # 5-25: forward 5-10, between 10-20, backward 20-25; 30-45: between 30-40, forward 40-45
    assert idle == pytest.approx({"forward": 10e-6, "backward": 5e-6, BETWEEN: 20e-6})


def test_kernels_outside_the_window_and_no_kernels():
    assert idle_by_phase([(-10, 2), (8, 100)], [("forward", 0, 10)]) == pytest.approx({"forward": 6e-6, BETWEEN: 0.0})
    assert idle_by_phase([], [("forward", 0, 10)]) == pytest.approx({"forward": 10e-6, BETWEEN: 0.0})
    assert idle_by_phase([(0, 1)], []) == {BETWEEN: 0.0}


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(loss=self.linear(x).square().mean())


def test_the_step_loop_labels_its_phases_for_the_profiler():
    model = _Tiny()
    prepared = types.SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    batches = [Batch({"x": torch.randn(3, 4)}) for _ in range(2)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_steps(prepared, batches, torch.device("cpu"))
    spans = phase_spans(prof)
    assert [name for name, _, _ in sorted(spans, key=lambda s: s[1])] == [*PHASE_LABEL] * 2
    assert all(start < end for _, start, end in spans)
