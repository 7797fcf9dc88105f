"""Command line of the benchmark harness.

    python -m benchmarks e2e --configs E1,E2,E3 --systems hf,liger,compile,unsloth,sloth_fx --results DIR
    python -m benchmarks sft --config R1 --systems hf,liger,unsloth,sloth_fx --results DIR
    python -m benchmarks kernels --results DIR
    python -m benchmarks lora-plans --results DIR
    python -m benchmarks maxlen --config E6 --systems hf,sloth_fx --lo 4096 --hi 65536 --results DIR
    python -m benchmarks profile --config E1 --layers 2 --systems hf,sloth_fx --results DIR
    python -m benchmarks ab --config E2 --set sloth_fx.kernels.lora_function.HOST_BOUND_TOKENS=4096,0 --steps 6
    python -m benchmarks report --results DIR
    python -m benchmarks worker --system hf --config E2 --out row.json     (one run; used by e2e, sft)

Each e2e or sft run and each maxlen probe is its own subprocess (ab and profile run in this one); ``--budget-s`` bounds the whole command
(each subprocess gets the time left, at most ``--timeout``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

_START = time.monotonic()  # --budget-s counts from here, imports included


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False, markup=False, width=160)


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    return {"layers": a.layers, "seq": a.seq, "batch": a.batch, "data": a.data}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, help="override the model's depth (smoke runs)")
    p.add_argument("--seq", type=int, help="override the sequence length")
    p.add_argument("--batch", type=int, help="override the batch size")
    p.add_argument("--data", choices=["random", "padded", "packed"], help="override the batch source")
    p.add_argument("--steps", type=int, default=8, help="steps in all, warm-up included (default 8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--unsloth-offload", action="store_true", help="Unsloth's offloaded checkpointing")
    p.add_argument("--allow-few-steps", action="store_true", help="fewer than 5 timed steps (probes, tests)")
    p.add_argument("--memory-cap-gib", type=float, help="cap PyTorch's allocator at this many GiB (a smaller GPU)")


def _unsloth_first(system: str) -> None:
    """Unsloth patches transformers at import: a process that runs it imports it first."""
    if system == "unsloth":
        try:
            import unsloth  # noqa: F401
        except Exception:
            pass  # the run reports the ImportError from systems._unsloth


def _device(a: argparse.Namespace) -> str:
    """``--device``, else CUDA where there is one."""
    import torch

    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_worker(a: argparse.Namespace) -> int:
    """One system on one configuration; always writes a row (ok or failed) and exits 0 unless
    the process itself dies."""
    _unsloth_first(a.system)
    from benchmarks.configs import get_config
    from benchmarks.e2e import classify_failure, environment, run_e2e, run_ladder
    from benchmarks.maxlen import ladder_lengths
    from benchmarks.sft import run_sft, sft_label

    device = _device(a)
    row: dict[str, Any] = {"system": a.system, "config": a.config}

    def write(r: dict[str, Any]) -> None:
        Path(a.out).write_text(json.dumps({**r, "env": environment()}, indent=1, default=str))

    try:
        cfg = get_config(a.config, **_overrides(a))
        row.update(config=cfg.id, config_desc=cfg.describe())
        opts = dict(device=device, seed=a.seed, unsloth_offload=a.unsloth_offload, allow_few_steps=a.allow_few_steps,
                    memory_cap_gib=a.memory_cap_gib)
        if a.stage == "ladder":
            row.update(run_ladder(a.system, cfg, ladder_lengths(a.lo, a.hi, a.granularity),
                                  progress=lambda r: write({**row, **r}), **opts))
        else:
            if a.stage == "sft":
                row.update(sft_label(cfg))
            run = run_sft if a.stage == "sft" else run_e2e
            row.update(run(a.system, cfg, steps=a.steps, warmup=a.warmup, **opts))
    except BaseException as e:  # noqa: BLE001 - every failure becomes the row's reason
        import traceback

        traceback.print_exc()
        row.update(status="failed", reason=classify_failure(e))
    write(row)
    return 0


def _deadline(budget: float | None) -> Any:
    end = _START + budget if budget else None
    return lambda cap: cap if end is None else min(cap, end - time.monotonic())


def cmd_e2e(a: argparse.Namespace) -> int:
    from benchmarks.configs import get_config

    names = a.configs.split(",")
    return _run_stage(a, names, {n: get_config(n, **_overrides(a)).id for n in names}, stage="e2e")


def cmd_sft(a: argparse.Namespace) -> int:
    from benchmarks.configs import get_config
    from benchmarks.sft import sft_label

    return _run_stage(a, [a.config], {a.config: sft_label(get_config(a.config, **_overrides(a)))["config"]}, stage="sft")


def _run_stage(a: argparse.Namespace, names: list[str], ids: dict[str, str], stage: str) -> int:
    """Each of ``a.systems`` on each configuration of ``names`` in its own worker (``--stage``),
    rows labelled with ``ids`` and written as ``<stage>_<config>_<system>.json``; then the report."""
    from benchmarks.e2e import environment
    from benchmarks.progress import RunBar
    from benchmarks.report import summary_table, write_report
    from benchmarks.runner import run_suite

    con = _console()
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "env.json").write_text(json.dumps(environment(), indent=1))
    left = _deadline(a.budget_s)
    opts = dict(_overrides(a), steps=a.steps, warmup=a.warmup, seed=a.seed, device=a.device,
                unsloth_offload=a.unsloth_offload, allow_few_steps=a.allow_few_steps, memory_cap_gib=a.memory_cap_gib)
    if stage != "e2e":
        opts["stage"] = stage
    rows = run_suite(
        a.systems.split(","), names, res, timeout=lambda: left(a.timeout), worker_opts=opts,
        progress=con.log, label_config=ids.get, bar=RunBar(con), file_prefix=stage,
    )
    con.print(summary_table(rows))
    con.log(f"report: {write_report(res)}")
    return 0


def cmd_kernels(a: argparse.Namespace) -> int:
    from benchmarks.kernels import run_kernels
    from benchmarks.report import kernel_table

    con = _console()
    result = run_kernels(a.ops.split(",") if a.ops else None, progress=con.log)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "kernels.json").write_text(json.dumps(result, indent=1))
    con.print(kernel_table(result))
    return 0


def cmd_lora_plans(a: argparse.Namespace) -> int:
    from benchmarks.lora_plans import lora_plans_table, run_lora_plans

    rows = run_lora_plans(progress=_console().log)
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "lora_plans.json").write_text(json.dumps(rows, indent=1))
    print(lora_plans_table(rows))
    return 0


def cmd_maxlen(a: argparse.Namespace) -> int:
    from benchmarks.maxlen import longest_reached, search_system
    from benchmarks.report import maxlen_file, maxlen_table, safe_name
    from benchmarks.runner import run_worker, worker_command

    con = _console()
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    left = _deadline(a.budget_s)
    common = dict(layers=a.layers, device=a.device, unsloth_offload=a.unsloth_offload, memory_cap_gib=a.memory_cap_gib)
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def probe(system: str, seq: int) -> dict[str, Any]:
        t = left(a.timeout)
        if t <= 0:
            return {"status": "failed", "reason": "not run: time budget spent"}
        out = res / f"probe_{safe_name(a.config)}_{system}_{seq}.json"
        cmd = worker_command(system, a.config, out, seq=seq, steps=2, warmup=1, allow_few_steps=True, **common)
        row = run_worker(cmd, out, timeout=t, label={"system": system, "config": a.config}, env=env)
        con.log(f"maxlen {system} seq={seq}: {row.get('status')} {row.get('reason', '')}")
        return row

    def ladder(system: str, systems_left: int) -> dict[str, Any]:
        t = left(float("inf")) / systems_left  # an equal share of what is left for each system still to climb
        t = None if t == float("inf") else t
        out = res / f"ladder_{safe_name(a.config)}_{system}.json"
        cmd = worker_command(system, a.config, out, stage="ladder", lo=a.lo, hi=a.hi, granularity=a.granularity,
                             **common)
        row = run_worker(cmd, out, timeout=t, label={"system": system, "config": a.config}, env=env)
        rungs = row.get("rungs", [])
        con.log(f"maxlen {system}: " + ", ".join(f"{r['seq']} {r.get('status')}" for r in rungs)
                + ("" if row.get("complete") else f" (stopped: {row.get('reason', 'out of time')})"))
        if not rungs:
            return {"system": system, "max_seq": None, "status": "failed", "reason": row.get("reason"),
                    "lo": a.lo, "hi": a.hi, "probes": []}
        result = longest_reached(system, [(r["seq"], r) for r in rungs], a.lo, a.hi)
        result.update(complete=bool(row.get("complete")), memory_cap_bytes=row.get("memory_cap_bytes"))
        return result

    systems = a.systems.split(",")
    if a.ladder:
        results = [ladder(s, len(systems) - i) for i, s in enumerate(systems)]
    else:
        results = [search_system(s, probe, a.lo, a.hi, a.granularity) for s in systems]
    (res / maxlen_file(a.config)).write_text(json.dumps(results, indent=1))
    con.print(maxlen_table(results))
    return 0


def cmd_profile(a: argparse.Namespace) -> int:
    from benchmarks.configs import get_config
    from benchmarks.profile import profile_steps

    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    for system in a.systems.split(","):
        out = profile_steps(system, get_config(a.config, **_overrides(a)), res, steps=a.steps, warmup=a.warmup)
        print(out.read_text())
    return 0


def cmd_ab(a: argparse.Namespace) -> int:
    _unsloth_first(a.system)
    from benchmarks.ab import run_ab, summarize
    from benchmarks.configs import get_config

    device = _device(a)
    result = run_ab(a.system, get_config(a.config, **_overrides(a)), a.set, blocks=a.blocks, steps=a.steps,
                    device=device, seed=a.seed, unsloth_offload=a.unsloth_offload, memory_cap_gib=a.memory_cap_gib)
    for row in result["blocks"]:
        print(f"block {row['block']} {result['setting']}={row['value']!r}: {row['tokens_per_s']:.0f} tokens/s, "
              f"steps {[round(t, 3) for t in row['step_times']]}, loss {row['loss']:.4f}, gpu {row['gpu']}")
    for s in summarize(result):
        print(f"{result['setting']}={s['value']}: median {s['median_tokens_per_s']} tokens/s over {s['blocks']} blocks after its first")
    res = Path(a.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / f"ab_{result['config']}_{a.system}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from benchmarks.report import write_report

    print(write_report(a.results))
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.configs import CONFIGS, SYSTEMS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("worker", help="one system on one configuration (internal)")
    w.add_argument("--system", required=True, choices=SYSTEMS)
    w.add_argument("--config", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--stage", choices=["e2e", "sft", "ladder"], default="e2e",
                   help="e2e: the harness's own step loop; sft: TRL's SFTTrainer, padding_free=True; "
                        "ladder: E6's lengths --lo..--hi by --granularity in turn, batch 1")
    w.add_argument("--lo", type=int)
    w.add_argument("--hi", type=int)
    w.add_argument("--granularity", type=int)
    _add_model_args(w)

    e = sub.add_parser("e2e", help="end-to-end runs, each system in its own subprocess")
    e.add_argument("--configs", default="E1,E2,E3", help=f"comma-separated, of {','.join(CONFIGS)}")
    e.add_argument("--systems", default=",".join(SYSTEMS))
    e.add_argument("--results", default="results/latest")
    e.add_argument("--timeout", type=float, default=600, help="seconds per run at most")
    e.add_argument("--budget-s", type=float, default=None, help="seconds for the whole command")
    _add_model_args(e)

    t = sub.add_parser("sft", help="TRL's SFTTrainer with padding_free=True, each system in its own subprocess")
    t.add_argument("--config", default="R1", help=f"one of {','.join(CONFIGS)}")
    t.add_argument("--systems", default="hf,liger,unsloth,sloth_fx")
    t.add_argument("--results", default="results/latest")
    t.add_argument("--timeout", type=float, default=600, help="seconds per run at most")
    t.add_argument("--budget-s", type=float, default=None, help="seconds for the whole command")
    _add_model_args(t)

    k = sub.add_parser("kernels", help="kernel microbenchmarks (GPU)")
    k.add_argument("--ops", default=None, help="comma-separated subset of op names")
    k.add_argument("--results", default="results/latest")

    lp = sub.add_parser("lora-plans", help="per projection: PEFT vs each fused LoRA form, cost model beside (GPU)")
    lp.add_argument("--results", default="results/latest")

    m = sub.add_parser("maxlen", help="E6: longest sequence at batch 1, by bisection")
    m.add_argument("--config", default="E6")
    m.add_argument("--systems", default=",".join(SYSTEMS))
    m.add_argument("--lo", type=int, default=4096)
    m.add_argument("--hi", type=int, default=65536)
    m.add_argument("--granularity", type=int, default=2048)
    m.add_argument("--timeout", type=float, default=300, help="seconds per probe at most")
    m.add_argument("--budget-s", type=float, default=None)
    m.add_argument("--layers", type=int)
    m.add_argument("--device", default=None)
    m.add_argument("--unsloth-offload", action="store_true")
    m.add_argument("--ladder", action="store_true",
                   help="one worker per system climbs the lengths in turn (one build) instead of a bisection")
    m.add_argument("--memory-cap-gib", type=float, help="cap PyTorch's allocator at this many GiB (a smaller GPU)")
    m.add_argument("--results", default="results/latest")

    f = sub.add_parser("profile", help="where a step's time goes: GPU busy and idle by phase, kernels, host functions (GPU)")
    f.add_argument("--config", required=True)
    f.add_argument("--systems", default="sloth_fx")
    f.add_argument("--results", default="results/latest")
    _add_model_args(f)

    b = sub.add_parser("ab", help="one process, one model, the same batches: blocks alternating a setting's values")
    b.add_argument("--config", required=True)
    b.add_argument("--system", default="sloth_fx", choices=SYSTEMS)
    b.add_argument("--set", required=True, help="module.NAME=v1,v2 (Python literals), e.g. "
                   "sloth_fx.kernels.lora_function.HOST_BOUND_TOKENS=4096,0")
    b.add_argument("--blocks", type=int, default=8, help="blocks in all, A, B, A, B, ... (default 8)")
    b.add_argument("--results", default="results/latest")
    _add_model_args(b)

    r = sub.add_parser("report", help="report.md and plots from a results folder")
    r.add_argument("--results", default="results/latest")

    a = p.parse_args(argv)
    return {"worker": cmd_worker, "e2e": cmd_e2e, "sft": cmd_sft, "kernels": cmd_kernels, "maxlen": cmd_maxlen, "lora-plans": cmd_lora_plans,
            "profile": cmd_profile, "ab": cmd_ab, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
