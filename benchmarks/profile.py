"""Where a system's training step spends its GPU time: ``torch.profiler`` over a few steps.

    python -m benchmarks profile --system sloth_fx --config E1 --layers 2 --results DIR

Prepares the system as the e2e run does (same model, batches and optimizer), runs ``warmup``
steps unprofiled, then profiles the rest and writes ``profile_<system>_<config>.txt``: the CUDA
kernels by total time (per step), so that two systems' tables can be read side by side.
"""

from __future__ import annotations

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
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        timed = train_steps(prepared, batches[warmup:], device)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)
    per_step = sum(timed["step_times"]) / len(timed["step_times"])
    out = results / f"profile_{system}_{safe_name(cfg.id)}.txt"
    out.write_text(f"{system} on {cfg.describe()}: {len(timed['step_times'])} profiled steps, "
                   f"{per_step * 1e3:.1f} ms a step under the profiler\n{table}\n")
    return out
