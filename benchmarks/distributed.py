"""The several-GPU mode: one configuration under DDP or FSDP2 on N processes, beside one process.

    python -m benchmarks.distributed --config E1 --systems hf_ddp,sloth_fx_ddp,sloth_fx_fsdp2 --gpus 2 --results DIR

Each system is trained by three ``torchrun`` launches, each its own subprocess with its own timeout
(a failure is a row, never the end of the command), scaling runs of every system first:

- N processes, each on the configuration's batch ``b`` (the global batch is ``N*b`` rows);
- 1 process on ``b`` rows: the baseline of scaling efficiency (tokens/s per GPU at N over at 1);
- 1 process on the whole ``N*b`` global batch, ``--check-steps`` steps (``--no-loss-check`` skips
  it): the run whose losses the N-process run must repeat.

Batches: step k's global batch is ``batches_for(cfg with batch=G)[k]`` of the run's global batch G;
rank r trains on its rows ``[r*G/W, (r+1)*G/W)``. So the N-process run and the third run see the
very same rows at every step (and the second run rank 0's rows). Their losses agree when every rank
holds as many labelled tokens (each rank's loss is the mean over its own tokens and DDP and FSDP2
average the ranks' gradients): true of ``random`` data, not of ``padded``; ``packed`` data (one
row) cannot be split and fails its rows.

Each rank builds its model with ``benchmarks.systems.prepare`` (same seed, same weights), wraps it
(DDP; or FSDP2: ``fully_shard`` on each decoder layer, then on the model, and a new AdamW over the
sharded adapters) and runs ``benchmarks.e2e.train_steps``. Rank 0 writes the row: per rank the step
times, tokens/s (mean tokens of a timed step over the median timed step), peak and model allocated
bytes; the losses averaged over the ranks. ``distributed.md`` holds the summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from benchmarks import stats
from benchmarks.data import Batch
from benchmarks.runner import run_worker

GIB = 1024**3
# system -> (system of benchmarks.systems that prepares the model, the wrapper)
DIST_SYSTEMS = {"hf_ddp": ("hf", "ddp"), "sloth_fx_ddp": ("sloth_fx", "ddp"), "sloth_fx_fsdp2": ("sloth_fx", "fsdp2")}
# A rank's watchdog fires this long before the launcher's timeout, so that the rank (which the
# launcher cannot reach: torchrun starts workers in their own sessions, and a killed torchrun
# leaves them running, holding the GPU) exits first and torchrun with it.
WATCHDOG_MARGIN_S = 15.0


# ------------------------------------------------------------------------------------- one rank


def rank_share(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's equal share of the global batch's rows."""
    rows = batch.inputs["input_ids"].shape[0]
    if rows % world:
        raise ValueError(f"a global batch of {rows} rows does not split over {world} ranks")
    mine = slice(rank * rows // world, (rank + 1) * rows // world)
    return Batch({k: v[mine] for k, v in batch.inputs.items()}, batch.lengths[mine])


def wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    """``model`` under DDP, or sharded by FSDP2 a decoder layer at a time, then as a whole."""
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    from benchmarks.models import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer)
    return fully_shard(model)


def train_rank(system: str, cfg: Any, global_batch: int, steps: int, warmup: int, seed: int,
               device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """Prepare, wrap and train on this rank's share; this rank's figures (collectives: every rank)."""
    import torch.distributed as dist

    from benchmarks.data import batches_for
    from benchmarks.e2e import synchronize, train_steps
    from benchmarks.models import make_optimizer
    from benchmarks.systems import Prepared, prepare

    rank, world = dist.get_rank(), dist.get_world_size()
    base_system, wrapper = DIST_SYSTEMS[system]
    if cfg.data == "packed":
        raise ValueError("packed batches are one row: they cannot be split over ranks")
    t0 = time.perf_counter()
    prepared = prepare(base_system, cfg, device, seed)
    if dtype is not None:  # before the first step, which is when sloth_fx captures the model
        prepared.model.to(dtype)
    runner = wrap(prepared.model, wrapper)
    # FSDP2 replaces the parameters by sharded ones: an optimizer made before holds the old ones.
    optimizer = make_optimizer(runner) if wrapper == "fsdp2" else prepared.optimizer
    synchronize(device)
    setup_s = time.perf_counter() - t0
    model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    batches = [rank_share(b, rank, world) for b in batches_for(cfg.replace(batch=global_batch), steps, seed)]
    result = train_steps(Prepared(runner, optimizer), batches, device)
    timed = stats.timed_steps(result["step_times"], warmup)
    slots = [b.slots for b in batches[warmup:]]
    result.update(setup_s=setup_s, model_bytes=model_bytes,
                  tokens_per_s=sum(slots) / len(slots) / stats.median(timed))
    if prepared.after_training is not None:
        result["notes"] = dict(prepared.notes, **prepared.after_training())
    return result


def _watchdog(deadline: float, failure_path: Path, rank: int) -> None:
    def fire() -> None:
        failure_path.write_text(json.dumps({"rank": rank, "reason": "timed out (the rank's watchdog)"}))
        os._exit(124)

    timer = threading.Timer(max(0.0, deadline - time.time()), fire)
    timer.daemon = True
    timer.start()


def cmd_worker(a: argparse.Namespace) -> int:
    """One rank of a torchrun launch. Rank 0 writes the row; a rank that fails writes its reason
    beside it (``<out>.rank<r>.failed``) and exits non-zero, which ends the launch."""
    import torch.distributed as dist

    from benchmarks.configs import get_config
    from benchmarks.e2e import classify_failure, environment

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    out = Path(a.out)
    failure_path = out.with_name(f"{out.name}.rank{rank}.failed")
    _watchdog(a.deadline, failure_path, rank)
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=max(60.0, a.deadline - time.time())))
    try:
        cfg = get_config(a.config, layers=a.layers)
        dtype = getattr(torch, a.dtype) if a.dtype else None
        mine = train_rank(a.system, cfg, a.global_batch, a.steps, a.warmup, a.seed, device, dtype)
        ranks: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    except BaseException as e:  # noqa: BLE001 - the reason goes to the launcher, the rank still fails
        failure_path.write_text(json.dumps({"rank": rank, "reason": classify_failure(e)}))
        raise
    if rank == 0:
        losses = [sum(step) / len(step) for step in zip(*(r["losses"] for r in ranks))]
        row = {"system": a.system, "config": cfg.id, "config_desc": cfg.describe(), "status": "ok",
               "processes": len(ranks), "global_batch": a.global_batch, "steps": a.steps, "warmup": a.warmup,
               "losses": losses, "rank_losses": [r["losses"] for r in ranks],
               "step_times_per_rank": [r["step_times"] for r in ranks],
               "tokens_per_s_per_rank": [r["tokens_per_s"] for r in ranks],
               "tokens_per_s_per_gpu": sum(r["tokens_per_s"] for r in ranks) / len(ranks),
               "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
               "model_bytes_per_rank": [r["model_bytes"] for r in ranks],
               "setup_s": max(r["setup_s"] for r in ranks), "notes": mine.get("notes", {}), "env": environment()}
        out.write_text(json.dumps(row, indent=1, default=str))
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------------- launcher


def launch(system: str, config: str, processes: int, global_batch: int, out: Path, timeout: float,
           a: argparse.Namespace, steps: int) -> dict[str, Any]:
    """One torchrun launch of ``processes`` ranks; its row, or a failure row with the reason a
    failed rank gave (else what torchrun printed)."""
    for stale in out.parent.glob(f"{out.name}.rank*.failed"):
        stale.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "benchmarks.distributed", "worker", "--system", system, "--config", config,
           "--global-batch", str(global_batch), "--steps", str(steps), "--warmup", str(min(a.warmup, steps - 1)),
           "--seed", str(a.seed), "--device", a.device, "--out", str(out),
           "--deadline", str(time.time() + timeout - WATCHDOG_MARGIN_S)]
    cmd += ["--layers", str(a.layers)] if a.layers else []
    cmd += ["--dtype", a.dtype] if a.dtype else []
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    label = {"system": system, "config": config, "processes": processes, "global_batch": global_batch}
    row = run_worker(cmd, out, timeout=timeout, label=label, env=env, log_path=out.with_suffix(".log"))
    failed = [json.loads(p.read_text()) for p in sorted(out.parent.glob(f"{out.name}.rank*.failed"))]
    if row.get("status") != "ok" and failed:
        row["reason"] = "; ".join(f"rank {f['rank']}: {f['reason']}" for f in failed)
    return row


def _ok(row: dict[str, Any] | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _tokens(row: dict[str, Any] | None) -> str:
    return f"{row['tokens_per_s_per_gpu']:.0f}" if _ok(row) else "—"


def _gib(row: dict[str, Any] | None) -> str:
    peaks = (row or {}).get("peak_bytes_per_rank") or []
    return "/".join(f"{p / GIB:.1f}" for p in peaks if p is not None) or "—"


def summary_table(rows: list[dict[str, Any]], gpus: int, per_gpu_batch: int) -> str:
    """Per system: tokens/s per GPU at 1 and at ``gpus``, scaling efficiency, peak GiB per rank,
    and the largest relative loss difference between the ``gpus`` run and one process on its
    global batch; a failed run shows its reason."""
    head = (f"| system | tokens/s per GPU, 1 GPU | tokens/s per GPU, {gpus} GPUs | scaling efficiency "
            f"| peak GiB per rank, 1 GPU | peak GiB per rank, {gpus} GPUs | max rel. loss diff, {gpus} GPUs vs 1 | failures |")
    lines = [head, "| --- " * 8 + "|"]
    by_run = {(r["system"], r["processes"], r["global_batch"]): r for r in rows}
    for system in dict.fromkeys(r["system"] for r in rows):
        one, many, check = (by_run.get((system, p, g)) for p, g in
                            ((1, per_gpu_batch), (gpus, gpus * per_gpu_batch), (1, gpus * per_gpu_batch)))
        eff = f"{many['tokens_per_s_per_gpu'] / one['tokens_per_s_per_gpu']:.1%}" if _ok(one) and _ok(many) else "—"
        diff = stats.max_relative_difference(many["losses"], check["losses"]) if _ok(many) and _ok(check) else None
        failures = "; ".join(f"{r['processes']}x{r['global_batch']}: {str(r.get('reason'))[:120]}"
                             for r in (one, many, check) if r is not None and not _ok(r)).replace("|", "/")
        lines.append(f"| {system} | {_tokens(one)} | {_tokens(many)} | {eff} | {_gib(one)} | {_gib(many)} "
                     f"| {'—' if diff is None else f'{diff:.2e}'} | {failures} |")
    return "\n".join(lines)


def cmd_launch(a: argparse.Namespace) -> int:
    """Every run of every system, the rows, and ``distributed.md``."""
    from benchmarks.configs import get_config
    from benchmarks.e2e import environment
    from benchmarks.report import env_line, safe_name

    end = time.monotonic() + a.budget_s if a.budget_s else None
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    env = environment()
    (res / "env.json").write_text(json.dumps(env, indent=1))
    cfg = get_config(a.config, layers=a.layers)
    b, n = cfg.batch, a.gpus
    systems = a.systems.split(",")
    runs = [(s, p, g, a.steps) for s in systems for p, g in ((n, n * b), (1, b))]
    runs += [] if a.no_loss_check else [(s, 1, n * b, min(a.check_steps, a.steps)) for s in systems]
    rows = []
    for i, (system, p, g, steps) in enumerate(runs):
        t = a.timeout if end is None else min(a.timeout, end - time.monotonic())
        out = res / f"dist_{safe_name(cfg.id)}_{system}_p{p}_b{g}.json"
        label = {"system": system, "config": cfg.id, "processes": p, "global_batch": g}
        print(f"[{i + 1}/{len(runs)}] {system}: {p} process(es), global batch {g}, {steps} steps (timeout {t:.0f} s)", flush=True)
        if system not in DIST_SYSTEMS:
            row = dict(label, status="failed", reason=f"unknown system; known: {', '.join(DIST_SYSTEMS)}")
        elif t <= WATCHDOG_MARGIN_S:
            row = dict(label, status="failed", reason="not run: time budget spent")
        else:
            row = launch(system, a.config, p, g, out, t, a, steps)
        out.write_text(json.dumps(row, indent=1, default=str))
        print(f"    -> {row['status']}: " + (f"{row['tokens_per_s_per_gpu']:.0f} tokens/s per GPU, peak GiB {_gib(row)}"
                                              if row["status"] == "ok" else str(row.get("reason"))), flush=True)
        rows.append(row)
    table = summary_table(rows, n, b)
    device = f"{n} x {env['gpu']}" if a.device == "cuda" else f"{n} CPU processes (gloo)"
    (res / "distributed.md").write_text(
        f"# sloth_fx on several GPUs: {cfg.describe()}\n\n{env_line(env)}\n\n{device}; per-GPU batch {b}; "
        f"{a.steps} steps, {a.warmup} of them warm-up; the loss check trains one process on the {n}-GPU run's "
        f"global batch for {min(a.check_steps, a.steps)} steps.\n\n{table}\n")
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="E1")
    p.add_argument("--layers", type=int, help="override the model's depth (smoke runs)")
    p.add_argument("--steps", type=int, default=6, help="steps in all, warm-up included (default 6)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="cast the prepared model, e.g. float32 (CPU tests: exact losses)")
    if argv[:1] == ["worker"]:
        p.add_argument("--system", required=True, choices=list(DIST_SYSTEMS))
        p.add_argument("--global-batch", type=int, required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--deadline", type=float, required=True, help="epoch seconds at which the rank gives up")
        return cmd_worker(p.parse_args(argv[1:]))
    p.add_argument("--systems", default=",".join(DIST_SYSTEMS))
    p.add_argument("--gpus", type=int, default=2, help="processes of the several-GPU run (one per GPU)")
    p.add_argument("--results", default="results/distributed")
    p.add_argument("--timeout", type=float, default=240, help="seconds per launch at most")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for the whole command")
    p.add_argument("--check-steps", type=int, default=3, help="steps of the loss check on one process (default 3)")
    p.add_argument("--no-loss-check", action="store_true", help="skip the one-process run on the global batch")
    return cmd_launch(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
