"""Results on disk and markdown tables.

Files in a results folder: ``e2e_<config>_<system>.json`` and ``sft_<config>_<system>.json`` (one
row each, of the same shape: ``python -m benchmarks e2e`` and ``sft``), ``kernels.json``,
``maxlen.json``, ``env.json``; ``write_report`` adds ``report.md`` and the plots of
``benchmarks/plots.py``: ``tokens_per_s.png``, ``peak_memory.png`` and ``loss_<config>.png``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.configs import CONFIGS, SYSTEMS

GIB = 1024**3
MIB = 1024**2


def load_rows(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every e2e and SFTTrainer row JSON in the folder (their config ids differ: ``R1``, ``SFT-pf/R1``)."""
    d = Path(results_dir)
    return [json.loads(p.read_text()) for stage in ("e2e", "sft") for p in sorted(d.glob(f"{stage}_*.json"))]


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """The distinct values, those in ``preferred`` first in its order, then the rest sorted."""
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + sorted(v for v in vals if v not in preferred)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row.get("status") != "ok":
        return "failed: " + str(row.get("reason", "unknown")).replace("|", "/").replace("\n", " ")[:160]
    peak = row.get("peak_bytes")
    rate = row.get("real_tokens_per_s") or row["tokens_per_s"]
    return f"{rate:.0f}" + (f" ({peak / GIB:.2f})" if peak else "")


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Config x system: ``real tokens/s (peak allocated GiB)`` or the failure reason. Real tokens
    leave padding out: on fixed-length data they are all the tokens, on padded batches they are
    what a padded step's slots hold of data."""
    systems = ordered((r["system"] for r in rows), SYSTEMS)
    configs = ordered((r["config"] for r in rows), list(CONFIGS))
    by = {(r["config"], r["system"]): r for r in rows}
    lines = ["| config | " + " | ".join(systems) + " |", "| --- |" + " --- |" * len(systems)]
    for c in configs:
        desc = next((r.get("config_desc") for r in rows if r["config"] == c and r.get("config_desc")), None)
        desc = desc or (CONFIGS[c].describe() if c in CONFIGS else c)
        lines.append(f"| {desc} | " + " | ".join(_cell(by.get((c, s))) for s in systems) + " |")
    return "\n".join(lines)


def config_notes(rows: list[dict[str, Any]]) -> str:
    """One line per configuration of the rows that has a note (a depth cut and why, what is
    4-bit): the row's ``config_note``, else the note of the configuration its id names
    (``M1[layers=2]`` is M1's, said to be with ``layers=2``); ``""`` when none has one."""
    lines = []
    for c in ordered((r["config"] for r in rows), list(CONFIGS)):
        note = next((r.get("config_note") for r in rows if r["config"] == c and r.get("config_note")), None)
        base = CONFIGS.get(c.split("[", 1)[0].removeprefix("SFT-pf/"))
        note = note or (base.note if base else "")
        if note and "[" in c:  # a smoke run's overrides (its depth among them) beside the note
            base_id, _, changes = c.partition("[")
            note = f"{base_id}'s note, this run with {changes.rstrip(']')}: {note}"
        if note:
            lines.append(f"- **{c}**: {note}")
    return "\n".join(lines)


def _fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v * scale, spec)


def memory_decision(row: dict[str, Any]) -> str:
    """What sloth_fx's steps did with their activations, from the row's ``explain``: each kind of
    decision seen (keep, recompute, offload), and "MLPs chunked" when a step chunked; "—" for
    systems that do not say."""
    explain = str((row.get("notes") or {}).get("explain", ""))
    modes = re.findall(r"activation checkpointing, (\w+) \(latest\)", explain)
    chunked = ["MLPs chunked"] if "MLPs over chunks of tokens" in explain else []
    return ", ".join(modes + chunked) or "—"


def _slowest(row: dict[str, Any]) -> str:
    slow = row.get("slowest_step")
    return f"{slow['s']:.2f} s ({slow['vs_median']:.1f}x)" if slow else "—"


def detail_table(rows: list[dict[str, Any]]) -> str:
    """One line per row with every figure, and sloth_fx's memory decision (:func:`memory_decision`)."""
    head = (
        "| config | system | tokens/s | real tokens/s | step s (median) | peak GiB | peak GiB after warm-up "
        "| model GiB | setup s | first step s | slowest timed step (x median per token) | MFU % "
        "| max rel. loss diff vs hf | activations | status |"
    )
    lines = [head, "| --- " * 15 + "|"]
    systems = list(SYSTEMS)
    key = lambda r: (list(CONFIGS).index(r["config"]) if r["config"] in CONFIGS else 99,
                     systems.index(r["system"]) if r["system"] in systems else 99)
    for r in sorted(rows, key=key):
        if r.get("status") != "ok":
            lines.append(f"| {r['config']} | {r['system']} |" + " — |" * 12 + f" {_cell(r)} |")
            continue
        lines.append(
            f"| {r['config']} | {r['system']} | {_fmt(r.get('tokens_per_s'), '.0f')} "
            f"| {_fmt(r.get('real_tokens_per_s'), '.0f')} | {_fmt(r.get('step_time_s'), '.3f')} "
            f"| {_fmt(r.get('peak_bytes'), '.2f', 1 / GIB)} | {_fmt(r.get('timed_peak_bytes'), '.2f', 1 / GIB)} "
            f"| {_fmt(r.get('model_bytes'), '.2f', 1 / GIB)} "
            f"| {_fmt(r.get('setup_s'), '.1f')} | {_fmt(r.get('first_step_s'), '.2f')} | {_slowest(r)} "
            f"| {_fmt(r.get('mfu'), '.1f', 100)} | {_fmt(r.get('loss_max_rel_diff_vs_hf'), '.2e')} "
            f"| {memory_decision(r)} | ok |"
        )
    return "\n".join(lines)


def kernel_table(result: dict[str, Any]) -> str:
    """Per op, shape, implementation and pass: median ms, GB/s and fraction of the copy bandwidth,
    TFLOP/s and fraction of the matmul rate for the matmul-bound ops, and on fwd+bwd rows the peak
    extra memory in MiB with its share of the ``torch`` implementation's at the same op and shape."""
    torch_peak = {
        (r["op"], r["shape"]): r["peak_extra_bytes"]
        for r in result["rows"]
        if r["impl"] == "torch" and r.get("peak_extra_bytes")
    }
    lines = [
        f"copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {result['matmul_flops'] / 1e12:.0f} TFLOP/s; "
        "peak extra: one forward+backward's peak allocation beyond its inputs "
        "(torch is plain PyTorch; for linear_cross_entropy, HF's path)",
        "",
        "| op | shape | impl | pass | ms | GB/s | of copy BW | TFLOP/s | of matmul | peak extra MiB |",
        "| --- " * 10 + "|",
    ]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | — | failed: {str(r.get('reason'))[:120]} | | | | | |")
            continue
        peak, ref = r.get("peak_extra_bytes"), torch_peak.get((r["op"], r["shape"]))
        share = f" ({peak / ref:.1%} of torch)" if peak is not None and ref and r["impl"] != "torch" else ""
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['phase']} | {r['ms']:.3f} | {r['gbps']:.0f} "
            f"| {r['bw_frac'] * 100:.0f}% | {_fmt(r.get('tflops'), '.0f')} | {_fmt(r.get('mm_frac'), '.0%')} "
            f"| {_fmt(peak, '.0f', 1 / MIB)}{share} |"
        )
    return "\n".join(lines)


def maxlen_table(result: list[dict[str, Any]]) -> str:
    """Per system: the longest sequence that trained at batch 1, tokens/s and peak GiB there, the probes."""
    lines = ["| system | longest seq at batch 1 | tokens/s there | peak GiB there | probes (seq: fits) |",
             "| --- | --- | --- | --- | --- |"]
    for r in result:
        best = str(r["max_seq"]) if r.get("max_seq") else f"failed: {r.get('reason')}"
        if r.get("max_seq") and r["max_seq"] >= r.get("hi", math.inf):
            best += " (the search's upper bound)"
        elif r.get("max_seq") and r.get("complete") is False:
            best += " (its ladder ran out of time)"
        if r.get("memory_cap_bytes"):
            best += f", allocator capped at {r['memory_cap_bytes'] / GIB:.0f} GiB"
        probes = ", ".join(f"{n}: {'yes' if ok else 'no'}" for n, ok in r.get("probes", []))
        lines.append(f"| {r['system']} | {best} | {_fmt(r.get('tokens_per_s'), '.0f')} "
                     f"| {_fmt(r.get('peak_bytes'), '.2f', 1 / GIB)} | {probes} |")
    return "\n".join(lines)


def maxlen_file(config: str) -> str:
    """The file of one configuration's E6 search in a results folder (``maxlen.json`` for E6's)."""
    return "maxlen.json" if config == "E6" else f"maxlen_{safe_name(config)}.json"


def safe_name(name: str) -> str:
    """A file-name-safe form of a configuration id (``R1[layers=2]`` -> ``R1-layers-2-``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def env_line(env: dict[str, Any]) -> str:
    keys = ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "unsloth")
    vers = ", ".join(f"{k} {env[k]}" for k in keys if env.get(k))
    return f"Measured {env.get('date', '?')} on {env.get('gpu', '?')}; {vers}."


def write_report(results_dir: str | Path) -> Path:
    """report.md (env line, summary, details, kernels, maxlen) and the plots, in the folder."""
    d = Path(results_dir)
    rows = load_rows(d)
    env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
    parts = ["# sloth_fx benchmark results", "", env_line(env), ""]
    if rows:
        from benchmarks.plots import plot_results  # here: plots imports this module, and matplotlib

        plot_results(rows, d)
        parts += [
            "## End to end: real tokens/s (peak allocated GiB)", "", summary_table(rows), "",
            "## End to end: every figure", "", detail_table(rows), "",
            "Plots: tokens_per_s.png, peak_memory.png, loss_<config>.png.", "",
        ]
        notes = config_notes(rows)
        if notes:
            parts += ["## Configuration notes", "", notes, ""]
    if (d / "kernels.json").exists():
        parts += ["## Kernels (forward; forward + backward)", "", kernel_table(json.loads((d / "kernels.json").read_text())), ""]
    if (d / "lora_plans.json").exists():
        from benchmarks.lora_plans import lora_plans_table

        parts += ["## LoRA per projection: PEFT and each fused form, the cost model beside", "",
                  lora_plans_table(json.loads((d / "lora_plans.json").read_text())), ""]
    for f in sorted(d.glob("maxlen*.json")):
        config = json.loads(f.read_text())
        title = "E6" if f.name == "maxlen.json" else f.stem.removeprefix("maxlen_")
        parts += [f"## {title}: longest sequence at batch 1", "", maxlen_table(config), ""]
    out = d / "report.md"
    out.write_text("\n".join(parts))
    return out
