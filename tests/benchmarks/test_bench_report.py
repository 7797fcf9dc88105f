"""Tables and plots from a fake result set."""

import json

import pytest

from benchmarks import plots, report

GIB = 1024**3


def _fake_rows():
    ok = lambda system, tps, peak, losses: {
        "system": system, "config": "E1", "config_desc": "E1 Llama-2-7B bf16 LoRA 8x2048 ckpt", "status": "ok",
        "tokens_per_s": tps, "real_tokens_per_s": tps, "step_time_s": 16384 / tps, "peak_bytes": peak * GIB,
        "model_bytes": 13.0 * GIB, "setup_s": 12.0, "first_step_s": 3.0, "mfu": 0.31, "losses": losses,
        "loss_max_rel_diff_vs_hf": 0.0,
    }
    return [
        ok("hf", 6209.0, 24.15, [11.2, 11.1, 11.0]),
        ok("liger", 7528.0, 21.84, [11.2, 11.1, 11.01]),
        {"system": "unsloth", "config": "E1", "status": "failed", "reason": "not installed: ModuleNotFoundError: No module named 'unsloth'"},
        {"system": "sloth_fx", "config": "E1", "status": "failed", "reason": "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"},
        dict(ok("hf", 8525.0, 48.28, [11.3, 11.2]), config="E2", config_desc="E2 Llama-2-7B bf16 LoRA 4x1024 no ckpt"),
        {"system": "compile", "config": "E2", "status": "failed", "reason": "timed out after 240 s"},
    ]


def test_summary_table_has_every_system_number_and_reason():
    t = report.summary_table(_fake_rows())
    head = t.splitlines()[0]
    assert head == "| config | hf | liger | compile | unsloth | sloth_fx |"  # BENCHMARKS.md's column order
    assert "6209 (24.15)" in t and "7528 (21.84)" in t and "8525 (48.28)" in t
    assert "failed: not installed: ModuleNotFoundError: No module named 'unsloth'" in t
    assert "failed: out of memory" in t and "failed: timed out after 240 s" in t
    assert "not run" in t  # E2 has no liger row at all
    e1 = next(l for l in t.splitlines() if l.startswith("| E1"))
    assert e1.count("|") == 7


def test_summary_counts_real_tokens_of_padded_batches():
    padded = dict(_fake_rows()[0], config="R1", config_desc="R1 real-length, padded", tokens_per_s=5306.0,
                  real_tokens_per_s=1732.0)
    t = report.summary_table([padded])
    assert "1732 (24.15)" in t and "5306" not in t


def test_detail_table_gives_the_peak_after_warm_up_beside_the_whole_run():
    row = dict(_fake_rows()[0], timed_peak_bytes=20.5 * GIB)
    hf = report.detail_table([row]).splitlines()[2]
    assert "| 24.15 | 20.50 | 13.00 |" in hf


def test_detail_table_rows():
    t = report.detail_table(_fake_rows())
    lines = [l for l in t.splitlines() if l.startswith("| E")]
    assert len(lines) == 6
    hf = next(l for l in lines if l.startswith("| E1 | hf"))
    assert "6209" in hf and "24.15" in hf and "31.0" in hf  # tokens/s, peak GiB, MFU %


def test_detail_table_says_what_sloth_fx_did_with_its_activations():
    explain = ("sloth_fx report\n  activation checkpointing, recompute (latest): predicted ...; this forward ran 32 MLPs "
               "over chunks of tokens\n  activation checkpointing, offload (latest): predicted ...\n")
    row = dict(_fake_rows()[0], system="sloth_fx", notes={"explain": explain})
    assert report.memory_decision(row) == "recompute, offload, MLPs chunked"
    assert report.memory_decision(_fake_rows()[0]) == "—"
    line = report.detail_table([row]).splitlines()[2]
    assert line.endswith("| recompute, offload, MLPs chunked | ok |") and line.count("|") == 16


def test_write_report_makes_pngs_and_markdown(tmp_path):
    for r in _fake_rows():
        (tmp_path / f"e2e_{r['config']}_{r['system']}.json").write_text(json.dumps(r))
    (tmp_path / "env.json").write_text(json.dumps({"date": "2026-11-24", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}))
    (tmp_path / "kernels.json").write_text(json.dumps({
        "copy_bandwidth": 3.0e12, "matmul_flops": 7.5e14,
        "rows": [
            {"op": "rmsnorm", "shape": "T=16384 H=4096", "impl": "sloth_fx", "status": "ok", "phase": "fwd", "ms": 0.1,
             "bytes": 268443648, "gbps": 2684.0, "bw_frac": 0.89, "tflops": None, "mm_frac": None},
            {"op": "rmsnorm", "shape": "T=16384 H=4096", "impl": "liger", "status": "failed", "reason": "not installed: x"},
        ],
    }))
    (tmp_path / "maxlen.json").write_text(json.dumps([
        {"system": "hf", "max_seq": 28672, "hi": 65536, "probes": [[4096, True], [65536, False]], "status": "ok",
         "tokens_per_s": 3493.4, "peak_bytes": 48.49 * GIB},
        {"system": "liger", "max_seq": None, "status": "failed", "reason": "not installed: y", "probes": []},
    ]))
    (tmp_path / report.maxlen_file("E6L3")).write_text(json.dumps([
        {"system": "sloth_fx", "max_seq": 65536, "hi": 65536, "probes": [[4096, True], [65536, True]], "status": "ok"},
    ]))
    md = report.write_report(tmp_path).read_text()
    for png in ("tokens_per_s.png", "peak_memory.png", "loss_E1.png", "loss_E2.png"):
        p = tmp_path / png
        assert p.exists() and p.stat().st_size > 1000, png
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "NVIDIA H100 80GB HBM3" in md and "2026-11-24" in md
    assert "6209 (24.15)" in md and "failed: out of memory" in md
    assert "| rmsnorm | T=16384 H=4096 | sloth_fx | fwd | 0.100 | 2684 | 89% |" in md
    assert "failed: not installed: x" in md
    assert "| hf | 28672 | 3493 | 48.49 |" in md and "failed: not installed: y" in md
    assert "## E6: longest" in md and "## E6L3: longest" in md and "| sloth_fx | 65536 (the search's upper bound) | — | — |" in md


def test_safe_plot_names(tmp_path):
    rows = [dict(r, config="R1[layers=2]") for r in _fake_rows()[:2]]
    paths = plots.plot_results(rows, tmp_path)
    assert (tmp_path / "loss_R1-layers-2-.png") in paths


def _slot_labels(fig):
    """The texts written into a bar chart's slots (not the bars' own value labels)."""
    return {t.get_text() for t in fig.axes[0].texts if t.get_rotation() == 90}


def test_bar_chart_labels_each_cell_without_a_value_with_its_reason():
    fig = plots.bar_figure(_fake_rows(), lambda r: r.get("tokens_per_s"), "tokens / s", "%.0f")
    assert _slot_labels(fig) == {
        "unsloth not run: not installed", "sloth_fx not run: out of memory",  # E1, failed rows
        "compile not run: timed out after 240 s",  # E2, failed row
        "liger not run: no result", "unsloth not run: no result", "sloth_fx not run: no result",  # E2, no row
        "compile not run: no result",  # E1, no row
    }
    bars = {c.get_label(): [b.get_height() for b in c] for c in fig.axes[0].containers}
    # only real values are bars, no zero-height stand-ins
    assert bars == {"hf": [6209.0, 8525.0], "liger": [7528.0], "compile": [], "unsloth": [], "sloth_fx": []}
    fig = plots.bar_figure(_fake_rows()[:2], lambda r: None, "peak", "%.1f")  # ok rows without the figure
    assert _slot_labels(fig) == {"hf: not measured", "liger: not measured"}


def test_short_reason():
    assert plots.short_reason({"reason": "not run: time budget spent"}) == "time budget spent"
    assert plots.short_reason({"reason": "killed by SIGKILL (host out of memory?): x"}) == "killed by SIGKILL"
    assert plots.short_reason({"reason": "KeyError: 'k' at e2e.py:12"}) == "KeyError"
    assert plots.short_reason(None) == "no result"


def _lines(fig):
    return {l.get_label(): list(l.get_ydata()) for l in fig.axes[0].get_lines()}


def test_loss_plot_draws_relative_differences_from_hf():
    rows = _fake_rows()
    assert plots.loss_vs_reference([r for r in rows if r["config"] == "E1"]) == {
        "hf": [0.0, 0.0, 0.0], "liger": [0.0, 0.0, pytest.approx(0.01 / 11.0)],
    }
    fig = plots.loss_figure(rows, "E1")
    lines = _lines(fig)
    assert lines["hf"] == [0.0, 0.0, 0.0]
    assert lines["liger"] == [0.0, 0.0, pytest.approx(0.01 / 11.0)]  # not the raw losses
    assert lines["unsloth not run: not installed"] == [] and lines["sloth_fx not run: out of memory"] == []
    assert "relative to hf" in fig.axes[0].get_title()


def test_loss_plot_without_hf_says_so_and_draws_plain_losses():
    rows = [r for r in _fake_rows() if r["system"] != "hf"]
    rows.append({"system": "hf", "config": "E1", "status": "failed", "reason": "out of memory (CUDA ...)"})
    assert plots.loss_vs_reference(rows) is None
    fig = plots.loss_figure(rows, "E1")
    assert _lines(fig)["liger"] == [11.2, 11.1, 11.01]
    assert "hf not run: out of memory; no reference" in fig.axes[0].get_title()
