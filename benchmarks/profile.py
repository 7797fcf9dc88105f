"""Where a system's training step spends its time: GPU kernels, GPU idle time and host functions.

    python -m benchmarks profile --system sloth_fx --config E1 --layers 2 --results DIR

Prepares the system as the e2e run does (same model, batches and optimizer), runs ``warmup``
steps unprofiled, then writes ``profile_<system>_<config>.txt`` with three parts:

- the step's wall time without any profiler, and the GPU's busy time in it: the union of the
  kernel intervals that ``torch.profiler`` records, per step, over the profiled steps' wall time
  (``busy / wall`` is the share of the step the GPU works; the rest is host time the GPU waits on);
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
from benchmarks.e2e import train_steps
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
        f"{min(1.0, busy / n / wall):.0%} of the unprofiled step\n\n"
        f"{table}\n\nhost: cProfile over {n} steps, by own time\n{host_text.getvalue()}\n")
    return out


def gpu_busy_seconds(prof: torch.profiler.profile) -> float:
    """Seconds during which at least one CUDA kernel or copy ran: the union of their intervals."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy * 1e-6
