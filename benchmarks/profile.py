"""Where a system's training step spends its time: GPU kernels, GPU idle time and host functions.

    python -m benchmarks profile --systems sloth_fx --config E1 --layers 2 --results DIR

Prepares the system as the e2e run does (same model, batches and optimizer), runs ``warmup``
steps unprofiled, then writes ``profile_<system>_<config>.txt`` with three parts:

- the step's wall time without any profiler, and the GPU's busy time in it: the union of the
  kernel intervals that ``torch.profiler`` records, per step, over the profiled steps' wall time
  (``busy / wall`` is the share of the step the GPU works; the rest is host time the GPU waits on);
- where the GPU waited: its idle time under the profiler, by the part of the step the host was
  in at the time (forward, backward, optimizer, or between them: the batch's copy, the
  synchronisation and the loss's read), so that a host-bound step shows which part to make
  cheaper on the host;
- the CUDA kernels by total time (per step), so that two systems' tables can be read side by side;
- cProfile's top host functions by own time over the same number of steps.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from benchmarks.configs import Config
from benchmarks.data import batches_for
from benchmarks.e2e import PHASE_LABEL, train_steps
from benchmarks.report import safe_name


def profile_steps(system: str, cfg: Config, results: Path, *, steps: int = 4, warmup: int = 2, seed: int = 0,
                  rows: int = 45) -> Path:
    """Profile ``steps - warmup`` steps of ``system`` on ``cfg``; the path of the written table."""
    from benchmarks.systems import prepare

    device = torch.device("cuda")
    batches = batches_for(cfg, steps, seed)
    prepared = prepare(system, cfg, device, seed)
    train_steps(prepared, batches[:warmup], device)
    measured = batches[warmup:]
    plain = train_steps(prepared, measured, device)["step_times"]
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        timed = train_steps(prepared, measured, device)
        profiled_wall = time.perf_counter() - t0
    busy = gpu_busy_seconds(prof)
    idle = idle_by_phase(kernel_spans(prof), phase_spans(prof))
    host = cProfile.Profile()
    host.enable()
    train_steps(prepared, measured, device)
    host.disable()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)
    n = len(measured)
    wall = sum(plain) / n
    host_text = io.StringIO()
    pstats.Stats(host, stream=host_text).sort_stats("tottime").print_stats(30)
    out = results / f"profile_{system}_{safe_name(cfg.id)}.txt"
    out.write_text(
        f"{system} on {cfg.describe()}: {n} steps\n"
        f"step wall time without profiler: {wall * 1e3:.1f} ms (steps: "
        f"{', '.join(f'{t * 1e3:.0f}' for t in plain)} ms)\n"
        f"GPU busy per step (union of kernel intervals): {busy / n * 1e3:.1f} ms = "
        f"{busy / profiled_wall:.0%} of the profiled steps' wall time "
        f"({sum(timed['step_times']) / n * 1e3:.1f} ms a step under the profiler), "
        f"{min(1.0, busy / n / wall):.0%} of the unprofiled step\n"
        f"GPU idle per step under the profiler, by the part of the step the host was in: "
        f"{', '.join(f'{phase} {seconds / n * 1e3:.1f} ms' for phase, seconds in idle.items())}\n\n"
        f"{table}\n\nhost: cProfile over {n} steps, by own time\n{host_text.getvalue()}\n")
    return out


Span = tuple[float, float]  # (start, end), microseconds on the profiler's clock
BETWEEN = "between phases"


def kernel_spans(prof: torch.profiler.profile) -> list[Span]:
    """The intervals during which a CUDA kernel or copy ran."""
    return [(e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def phase_spans(prof: torch.profiler.profile) -> list[tuple[str, float, float]]:
    """``(phase, start, end)`` of every labelled part of every step (:data:`benchmarks.e2e.PHASE_LABEL`)."""
    phase_of = {label: phase for phase, label in PHASE_LABEL.items()}
    return [(phase_of[e.name], e.time_range.start, e.time_range.end) for e in prof.events()
            if e.name in phase_of and e.device_type == torch.autograd.DeviceType.CPU]


def gpu_busy_seconds(prof: torch.profiler.profile) -> float:
    """Seconds during which at least one CUDA kernel or copy ran: the union of their intervals."""
    return sum(end - start for start, end in merged(kernel_spans(prof))) * 1e-6


def merged(spans: list[Span]) -> list[Span]:
    """The union of ``spans`` as sorted, disjoint intervals."""
    out: list[Span] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def idle_by_phase(kernels: list[Span], phases: list[tuple[str, float, float]]) -> dict[str, float]:
    """Seconds during which no kernel ran, from the first phase's start to the last one's end, by
    the phase the host was in (a gap over several phases is split among them; :data:`BETWEEN`
    where it was in none)."""
    idle = dict.fromkeys([*(name for name, _, _ in phases), BETWEEN], 0.0)
    if not phases:
        return idle
    cursor, window_end = min(s for _, s, _ in phases), max(e for _, _, e in phases)
    gaps = []
    for start, end in [*merged(kernels), (window_end, window_end)]:
        if start > cursor:
            gaps.append((cursor, min(start, window_end)))
        cursor = max(cursor, end)
        if cursor >= window_end:
            break
    for gap_start, gap_end in gaps:
        covered = 0.0
        for name, start, end in phases:
            overlap = max(0.0, min(gap_end, end) - max(gap_start, start))
            idle[name] += overlap * 1e-6
            covered += overlap
        idle[BETWEEN] += (gap_end - gap_start - covered) * 1e-6
    return idle
