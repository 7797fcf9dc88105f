"""Runs each system in its own subprocess and collects the JSON rows.

A crash, an out-of-memory, a missing peer or a timeout gives a row with ``status="failed"`` and
the reason; it never stops the run. After all rows are in, each gets its largest relative loss
difference from hf's at the same step (``loss_max_rel_diff_vs_hf``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks import stats
from benchmarks.progress import RunBar
from benchmarks.report import safe_name

# A timed step this many times slower per token than the median is named in the run's summary line.
STALL_RATIO = 3.0
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)|Killed|Segmentation fault)\b")


def reason_from_output(text: str, returncode: int | None, timed_out: bool, timeout: float | None) -> str:
    """The reason for a failure row from a dead worker's stderr and exit status."""
    if timed_out:
        return f"timed out after {timeout:.0f} s"
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    err = next((l for l in reversed(lines) if _ERROR_LINE.match(l)), None)
    if returncode is not None and returncode < 0:
        try:
            sig = signal.Signals(-returncode).name
        except ValueError:
            sig = f"signal {-returncode}"
        base = f"killed by {sig}" + (" (host out of memory?)" if sig == "SIGKILL" else "")
        return base + (f": {err[:200]}" if err else "")
    if err:
        return err[:300]
    tail = lines[-1][:300] if lines else "no output"
    return f"exit status {returncode}: {tail}"


def run_worker(
    cmd: Sequence[str],
    out_path: str | Path,
    *,
    timeout: float | None,
    label: dict[str, Any],
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run one worker command that should write its row as JSON to ``out_path``; return that row,
    or a failure row (``label`` plus status and reason) when it wrote none."""
    out_path = Path(out_path)
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    timed_out = False
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, env=env, start_new_session=True
        )
        rc, output = proc.returncode, (proc.stdout or "") + (proc.stderr or "")
    except subprocess.TimeoutExpired as e:
        timed_out, rc = True, None
        output = _text(e.stdout) + _text(e.stderr)
    wall = time.perf_counter() - t0
    if log_path is not None:
        Path(log_path).write_text(output)
    row: dict[str, Any] | None = None
    if out_path.exists():
        try:
            row = json.loads(out_path.read_text())
        except json.JSONDecodeError as e:
            row = None
            output += f"\nJSONDecodeError: worker wrote unreadable JSON ({e})"
    if row is None or (timed_out and row.get("status") != "ok"):
        row = dict(label)
        row.update(status="failed", reason=reason_from_output(output, rc, timed_out, timeout), returncode=rc)
    row.setdefault("wall_s", wall)
    return row


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def worker_command(system: str, config: str, out: str | Path, **opts: Any) -> list[str]:
    """The command line of one e2e worker (``python -m benchmarks worker ...``)."""
    cmd = [sys.executable, "-m", "benchmarks", "worker", "--system", system, "--config", config, "--out", str(out)]
    for k, v in opts.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        cmd += [flag] if v is True else [flag, str(v)]
    return cmd


def attach_loss_diffs(rows: list[dict[str, Any]], reference: str = "hf") -> None:
    """Set ``loss_max_rel_diff_vs_hf`` on each ok row that has an ok hf row of the same config."""
    ref = {r["config"]: r for r in rows if r.get("system") == reference and r.get("status") == "ok"}
    for r in rows:
        base = ref.get(r.get("config"))
        if r.get("status") == "ok" and base is not None and r.get("losses"):
            r["loss_max_rel_diff_vs_hf"] = stats.max_relative_difference(r["losses"], base["losses"])


def run_suite(
    systems: Iterable[str],
    configs: Iterable[str],
    results_dir: str | Path,
    *,
    timeout: float | Callable[[], float],
    worker_opts: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    command: Callable[[str, str, Path], list[str]] | None = None,
    label_config: Callable[[str], str | None] | None = None,
    bar: RunBar | None = None,
    file_prefix: str = "e2e",
) -> list[dict[str, Any]]:
    """Every (config, system) pair in its own subprocess; the rows, loss differences attached.
    ``timeout`` may be a function (re-read before each run: a shrinking time budget); ``progress``
    gets a line as each run starts and ends, ``bar`` (if any) shows how many runs are done. Each
    row and worker log is ``<file_prefix>_<config>_<system>.json`` / ``.log`` in ``results_dir``
    (another stage of the same configurations takes its own prefix so as not to overwrite them)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pairs = [(c, s) for c in configs for s in systems]
    outs = [results_dir / f"{file_prefix}_{safe_name(c)}_{s}.json" for c, s in pairs]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with bar.over(len(pairs)) if bar else nullcontext():
        for i, ((cfg, system), out) in enumerate(zip(pairs, outs)):
            t = timeout() if callable(timeout) else timeout
            label = {"system": system, "config": (label_config(cfg) if label_config else None) or cfg}
            if bar:
                bar.begin(f"{cfg} {system}")
            if t <= 0:
                row = dict(label, status="failed", reason="not run: time budget spent")
            else:
                cmd = command(system, cfg, out) if command else worker_command(system, cfg, out, **(worker_opts or {}))
                if progress:
                    progress(f"[{i + 1}/{len(pairs)}] {cfg} {system} (timeout {t:.0f} s)")
                row = run_worker(cmd, out, timeout=t, label=label, env=env, log_path=out.with_suffix(".log"))
            out.write_text(json.dumps(row, indent=1, default=str))
            if progress:
                progress(f"    -> {summarize_row(row)}")
            if bar:
                bar.done()
            rows.append(row)
    attach_loss_diffs(rows)
    for out, r in zip(outs, rows):
        out.write_text(json.dumps(r, indent=1, default=str))
    return rows


def summarize_row(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"FAILED: {row.get('reason')}"
    peak = row.get("peak_bytes")
    mem = f", peak {peak / 2**30:.2f} GiB" if peak else ""
    tps, first, slow = row.get("tokens_per_s"), row.get("first_step_s"), row.get("slowest_step")
    stall = (f", timed step {slow['step']} took {slow['s']:.2f} s, {slow['vs_median']:.1f}x the median per token"
             if slow and slow["vs_median"] >= STALL_RATIO else "")
    return (f"{tps:.0f} tokens/s" if tps else "ok") + mem + (f", first step {first:.1f} s" if first else "") + stall
