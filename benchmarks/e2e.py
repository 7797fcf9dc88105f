"""The end-to-end step loop of one system on one configuration (run inside its own subprocess).

A step is: forward with labels, backward, optimizer step, ``zero_grad``, ``torch.cuda.synchronize``.
``warmup`` steps first (3 by default), then at least 5 timed ones; tokens/s uses the median.
Recorded: every step's time and loss, the preparation time, the first step's time (capture and
compile cost), the model's own memory once prepared (before the first step), the peak allocated
memory over the steps (after ``reset_peak_memory_stats``), and MFU against the bf16 matmul rate
measured in the same process.
"""

from __future__ import annotations

import datetime
import platform
import time
import traceback
from typing import Any

import torch
from torch.profiler import record_function

from benchmarks import flops as flops_mod
from benchmarks import stats
from benchmarks.configs import Config
from benchmarks.data import Batch, batches_for

GIB = 1024**3
MIN_TIMED_STEPS = 5
# The parts of a step as the profiler sees them (benchmarks.profile attributes the GPU's idle time
# to them); a label costs a few microseconds a step when no profiler runs.
PHASE_LABEL = {phase: f"step.{phase}" for phase in ("forward", "backward", "optimizer")}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_rate(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """bf16 ``n x n x n`` matmul FLOP/s on random data, median of ``reps`` after 3 warm-ups
    (CUDA events); ``None`` off the GPU (no MFU is claimed for a CPU run)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / stats.median(times)


def environment() -> dict[str, Any]:
    """Date, GPU and library versions of this process."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)",
    }
    # Versions from the installed metadata, not by importing: importing unsloth alone takes
    # tens of seconds and patches transformers.
    from importlib import metadata

    for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
                      ("bitsandbytes", "bitsandbytes"), ("liger_kernel", "liger-kernel"), ("unsloth", "unsloth")):
        try:
            env[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[mod] = None
    return env


def train_steps(prepared: Any, batches: list[Batch], device: torch.device, warmup: int = 0) -> dict[str, Any]:
    """Run one step per batch; returns step times, losses, the peak allocated bytes over every step
    (``peak_bytes``) and, with ``warmup``, over the steps after the first ``warmup`` (``timed_peak_bytes``:
    a first step that captures, compiles or calibrates can peak above the steady state)."""
    model, opt = prepared.model, prepared.optimizer
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    losses: list[float] = []
    first_peak = 0
    for k, batch in enumerate(batches):
        if device.type == "cuda" and warmup and k == warmup:
            first_peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        b = batch.to(device)
        synchronize(device)
        t0 = time.perf_counter()
        with record_function(PHASE_LABEL["forward"]):
            out = model(**b.inputs)
            loss = out.loss if hasattr(out, "loss") else out[0]
        with record_function(PHASE_LABEL["backward"]):
            loss.backward()
        with record_function(PHASE_LABEL["optimizer"]):
            opt.step()
            opt.zero_grad(set_to_none=True)
        synchronize(device)
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float().item()))
        del out, loss
    if device.type != "cuda":
        return {"step_times": step_times, "losses": losses, "peak_bytes": None}
    timed_peak = torch.cuda.max_memory_allocated(device)
    figures = {"step_times": step_times, "losses": losses, "peak_bytes": max(first_peak, timed_peak)}
    if warmup and len(batches) > warmup:
        figures["timed_peak_bytes"] = timed_peak
    return figures


def require_timed_steps(steps: int, warmup: int, allow_few_steps: bool) -> None:
    """Raise unless ``steps`` leaves at least ``MIN_TIMED_STEPS`` after ``warmup`` (or the caller
    allows fewer: probes, tests)."""
    if steps - warmup < MIN_TIMED_STEPS and not allow_few_steps:
        raise ValueError(f"need at least {MIN_TIMED_STEPS} timed steps after {warmup} warm-up, got {steps} steps")


def timed_prepare(system: str, cfg: Config, dev: torch.device, seed: int,
                  opts: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``prepare(system, cfg, ...)`` and the set-up figures of its row: the device's measured matmul
    rate (for MFU), the seconds preparing took, the model's bytes on the device and, with
    ``opts["memory_cap_gib"]``, the allocator's cap (:func:`cap_process_memory`), set once the
    model is built: the cap stands for a smaller GPU's training, and the harness's build is not
    a user's (random weights made on the device; M2q's experts made dense, then quantized, where a
    user quantizes stacks that never were all on the GPU at once)."""
    from benchmarks.systems import prepare

    opts = dict(opts)
    cap_gib = opts.pop("memory_cap_gib", None)
    setup: dict[str, Any] = {"matmul_flops": measure_matmul_rate(dev)}
    t0 = time.perf_counter()
    prepared = prepare(system, cfg, dev, seed, **opts)
    synchronize(dev)
    setup["setup_s"] = time.perf_counter() - t0
    setup["model_bytes"] = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    if cap_gib:
        setup["memory_cap_bytes"] = cap_process_memory(dev, cap_gib)
    return prepared, setup


def cap_process_memory(device: torch.device, gib: float) -> int:
    """Cap PyTorch's allocator on ``device`` at ``gib`` GiB (``set_per_process_memory_fraction``,
    after emptying its cache): a smaller GPU on a larger one. The cap in bytes. Raises
    ``ValueError`` for a cap outside the device's memory or below what is allocated already."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap = int(gib * 2**30)
    if not 0 < cap <= total:
        raise ValueError(f"memory cap {gib} GiB is not within the device's {total / 2**30:.1f} GiB")
    held = torch.cuda.memory_allocated(device)
    if held > cap:
        raise ValueError(f"memory cap {gib} GiB is below the {held / 2**30:.2f} GiB the prepared model holds")
    torch.cuda.empty_cache()
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    return cap


def require_packed_ok(system: str, cfg: Config, prepared: Any) -> None:
    """Raise ``Unsupported`` where ``cfg``'s batches are packed rows and ``system`` takes none."""
    from benchmarks.systems import Unsupported

    if cfg.data == "packed" and not prepared.packed_ok:
        raise Unsupported(f"{system} takes no packed input")


def run_e2e(
    system: str,
    cfg: Config,
    *,
    device: str = "cuda",
    steps: int = 8,
    warmup: int = 3,
    seed: int = 0,
    **opts: Any,
) -> dict[str, Any]:
    """Prepare ``system`` on ``cfg`` and train ``steps`` steps; the result row as a dict.
    Raises on failure (the worker turns exceptions into failure rows)."""
    require_timed_steps(steps, warmup, opts.pop("allow_few_steps", False))
    dev = torch.device(device)
    row: dict[str, Any] = {"system": system, "config": cfg.id, "config_desc": cfg.describe(), "status": "running"}
    if cfg.note:
        row["config_note"] = cfg.note  # the report prints it under the tables (a depth cut and why)
    batches = batches_for(cfg, steps, seed)
    prepared, setup = timed_prepare(system, cfg, dev, seed, opts)
    row.update(setup)
    require_packed_ok(system, cfg, prepared)
    row["notes"] = prepared.notes
    res = train_steps(prepared, batches, dev, warmup)
    row.update(res)
    if prepared.after_training is not None:
        row["notes"].update(prepared.after_training())
    row.update(step_figures(cfg, batches, res["step_times"], warmup, row["matmul_flops"]))
    row["status"] = "ok"
    return row


def run_ladder(
    system: str,
    cfg: Config,
    lengths: list[int],
    *,
    device: str = "cuda",
    seed: int = 0,
    progress: Any = None,
    **opts: Any,
) -> dict[str, Any]:
    """Prepare ``system`` once (for the longest length) and train two steps at each of ``lengths``
    in turn (batch 1) until one fails (:func:`benchmarks.maxlen.climb`); the row with its rungs,
    each with its status (or reason), tokens/s of its second step and peak allocated bytes.
    ``progress(row)`` sees the row after each rung."""
    import gc

    from benchmarks.maxlen import climb

    opts.pop("allow_few_steps", None)
    dev = torch.device(device)
    row: dict[str, Any] = {"system": system, "config": cfg.id, "config_desc": cfg.describe(), "status": "ok",
                           "complete": False}
    prepared, setup = timed_prepare(system, cfg.replace(seq=max(lengths), batch=1), dev, seed, opts)
    row.update(setup, notes=prepared.notes)

    def rung(n: int) -> dict[str, Any]:
        try:
            res = train_steps(prepared, batches_for(cfg.replace(seq=n, batch=1), 2, seed), dev, warmup=1)
            out = {"status": "ok", "tokens_per_s": n / res["step_times"][1], "peak_bytes": res["peak_bytes"],
                   "step_times": res["step_times"], "losses": res["losses"]}
        except Exception as e:  # noqa: BLE001 - out of memory ends the climb with its reason
            out = {"status": "failed", "reason": classify_failure(e)}
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if prepared.after_training is not None:  # sloth_fx's explain: what this length's steps decided
            out["notes"] = prepared.after_training()
        return out

    def report(rungs: list[dict[str, Any]]) -> None:
        row["rungs"] = rungs
        if progress is not None:
            progress(row)

    climb(rung, lengths, report)
    row["complete"] = True
    return row


def step_figures(
    cfg: Config, batches: list[Batch], step_times: list[float], warmup: int, matmul_flops: float | None
) -> dict[str, Any]:
    """A run's throughput from the batch and the time of each step (one batch per step): the first
    step's time, the median step time and, over the steps after ``warmup``, tokens/s over all
    positions and over real tokens, FLOPs per step and MFU (``None`` without ``matmul_flops``);
    slots and real tokens per step over every step."""
    row: dict[str, Any] = {"first_step_s": step_times[0]}
    timed = stats.timed_steps(step_times, warmup)
    med = stats.median(timed)
    slots = sum(b.slots for b in batches) / len(batches)
    real = sum(b.real_tokens for b in batches) / len(batches)
    row["step_time_s"] = med
    # Tokens/s over the timed steps: slots (padding included) and real tokens (padding excluded).
    timed_batches = batches[warmup:]
    row["tokens_per_s"] = sum(b.slots for b in timed_batches) / sum(timed)
    row["real_tokens_per_s"] = sum(b.real_tokens for b in timed_batches) / sum(timed)
    if cfg.data == "random":  # every batch alike: the definition of BENCHMARKS.md, median step
        row["tokens_per_s"] = row["real_tokens_per_s"] = cfg.tokens_per_step / med
    row["slots_per_step"], row["real_tokens_per_step"] = slots, real
    row["slowest_step"] = slowest_step(timed, timed_batches, warmup)
    per_step_flops = [flops_mod.step_flops(cfg.shape, b.lengths, cfg.checkpointing)["total"] for b in timed_batches]
    row["flops_per_step"] = sum(per_step_flops) / len(per_step_flops)
    row["mfu"] = sum(per_step_flops) / sum(timed) / matmul_flops if matmul_flops else None
    return row


def slowest_step(timed: list[float], timed_batches: list[Batch], warmup: int) -> dict[str, Any]:
    """The timed step with the most seconds per real token, and how many times the timed steps'
    median per token that is: a compile or a synchronisation inside the timed steps shows as a
    ratio far above 1 (ragged batches differ in length, hence per token)."""
    per_token = [t / max(1, b.real_tokens) for t, b in zip(timed, timed_batches)]
    worst = max(range(len(per_token)), key=per_token.__getitem__)
    return {"step": warmup + worst, "s": timed[worst], "vs_median": per_token[worst] / stats.median(per_token)}


def classify_failure(exc: BaseException) -> str:
    """A one-line reason for a failure row: out of memory, not installed, unsupported, or the
    exception with where it was raised."""
    from benchmarks.systems import Unsupported

    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in msg.lower():
        return f"out of memory ({msg[:160]})"
    if isinstance(exc, ImportError):
        return f"not installed: {type(exc).__name__}: {msg[:200]}"
    if isinstance(exc, Unsupported):
        return f"unsupported: {msg[:300]}"
    tb = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {msg[:300]}{where}"
