"""A/B of a module-level setting in one process: one model, the same batches, blocks that alternate.

Separate runs compare badly on these machines: one E2 setting gave 12.1k tokens/s in one run and
15.8k in another (H200, 2026-11-30), more than the effect measured. ``run_ab`` removes what
differs between runs: it prepares the system once, then trains ``blocks`` blocks of the same
``steps`` batches, setting ``module.NAME`` to the next value before each (A, B, A, B, ...). A
block's first step is not timed (a value's first block compiles what it runs); the first block of
each value is reported but left out of the summary. Each block also records the GPU's clock, power
and throttle reasons (``nvidia-smi``) where there is one, since a power cap shows as slow blocks.

The setting is read by name: ``"sloth_fx.kernels.lora_function.HOST_BOUND_TOKENS"`` with values
``[4096, 0]``. Code that copies the value at import (``from m import X``) does not see the change:
set it where it is read.
"""

from __future__ import annotations

import ast
import importlib
import shutil
import statistics
import subprocess
from typing import Any

import torch

from benchmarks.configs import Config
from benchmarks.data import batches_for
from benchmarks.e2e import require_packed_ok, timed_prepare, train_steps

__all__ = ["gpu_state", "parse_setting", "run_ab", "summarize"]

_GPU_QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


def parse_setting(spec: str) -> tuple[Any, str, list[Any]]:
    """``"package.module.NAME=v1,v2"`` -> (the module, ``NAME``, [v1, v2]); values are Python
    literals. Raises ``ValueError`` naming what is wrong."""
    target, sep, raw = spec.partition("=")
    path, dot, name = target.strip().rpartition(".")
    if not sep or not dot or not raw.strip():
        raise ValueError(f"--set takes module.NAME=v1,v2, got {spec!r}")
    module = importlib.import_module(path)
    if not hasattr(module, name):
        raise ValueError(f"{path} has no {name!r} to set")
    try:
        values = [ast.literal_eval(v.strip()) for v in raw.split(",")]
    except (ValueError, SyntaxError):
        raise ValueError(f"the values of {target} must be Python literals, got {raw!r}") from None
    if len(values) < 2:
        raise ValueError(f"an A/B needs two values or more for {target}, got {values}")
    return module, name, values


def gpu_state() -> str | None:
    """The GPU's SM clock, power draw, temperature and active throttle reasons, or None."""
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", f"--query-gpu={_GPU_QUERY}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def run_ab(system: str, cfg: Config, spec: str, *, blocks: int, steps: int, device: str = "cuda",
           seed: int = 0, **opts: Any) -> dict[str, Any]:
    """Prepare ``system`` on ``cfg`` once and train ``blocks`` blocks of the same ``steps`` batches,
    alternating the values of ``spec`` (see :func:`parse_setting`); the setting's own value is put
    back afterwards. ``opts`` go to the system's preparation (as an e2e run's do). The result: the
    setting, and one row per block with its value, tokens/s over its steps after the first (real
    tokens), step times, last loss and GPU state."""
    module, name, values = parse_setting(spec)
    if steps < 2 or blocks < len(values):
        raise ValueError(f"need at least 2 steps a block and a block per value, got {steps} and {blocks}")
    dev = torch.device(device)
    batches = batches_for(cfg, steps, seed)
    prepared, setup = timed_prepare(system, cfg, dev, seed, opts)
    require_packed_ok(system, cfg, prepared)
    real = [b.real_tokens for b in batches]
    original = getattr(module, name)
    rows = []
    try:
        for block in range(blocks):
            value = values[block % len(values)]
            setattr(module, name, value)
            res = train_steps(prepared, batches, dev)
            times = res["step_times"]
            rows.append({"block": block, "value": value, "tokens_per_s": sum(real[1:]) / sum(times[1:]),
                         "step_times": times, "loss": res["losses"][-1], "gpu": gpu_state()})
    finally:
        setattr(module, name, original)
    return {"system": system, "config": cfg.id, "setting": spec.partition("=")[0], **setup, "blocks": rows}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per value: the median tokens/s of its blocks after its first, and how many blocks that is."""
    by_value: dict[str, list[float]] = {}
    for row in result["blocks"]:
        by_value.setdefault(repr(row["value"]), []).append(row["tokens_per_s"])
    return [{"value": v, "median_tokens_per_s": statistics.median(t[1:]) if len(t) > 1 else None, "blocks": len(t) - 1}
            for v, t in by_value.items()]
