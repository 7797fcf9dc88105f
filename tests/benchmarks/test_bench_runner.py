"""The subprocess runner: a crash, a signal or a hang becomes a failure row; the suite goes on."""

import json
import sys

import pytest
import torch

from benchmarks import runner
from benchmarks.configs import get_config
from benchmarks.e2e import classify_failure, run_e2e
from benchmarks.systems import Unsupported


def _py(code):
    return [sys.executable, "-c", code]


def test_crash_gives_failure_row_with_the_error(tmp_path):
    code = "import sys; print('building'); sys.stderr.write('Traceback (most recent call last):\\n  x\\nRuntimeError: boom\\n'); sys.exit(1)"
    row = runner.run_worker(_py(code), tmp_path / "r.json", timeout=60, label={"system": "x", "config": "E1"})
    assert row["status"] == "failed" and row["reason"] == "RuntimeError: boom"
    assert row["system"] == "x" and row["config"] == "E1" and row["returncode"] == 1


def test_signal_and_timeout(tmp_path):
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    row = runner.run_worker(_py(code), tmp_path / "r.json", timeout=60, label={"system": "x", "config": "E1"})
    assert row["status"] == "failed" and row["reason"].startswith("killed by SIGSEGV")
    row = runner.run_worker(_py("import time; time.sleep(30)"), tmp_path / "r.json", timeout=1, label={"system": "x", "config": "E1"})
    assert row["status"] == "failed" and row["reason"] == "timed out after 1 s"


def test_worker_json_is_taken_and_stale_json_is_not(tmp_path):
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"status": "ok", "stale": True}))  # left from an earlier run
    row = runner.run_worker(_py("import sys; sys.exit(3)"), out, timeout=60, label={"system": "x", "config": "E1"})
    assert row["status"] == "failed" and "exit status 3" in row["reason"]
    code = f"import json; open({str(out)!r}, 'w').write(json.dumps({{'system': 'x', 'config': 'E1', 'status': 'ok', 'losses': [1.0]}}))"
    row = runner.run_worker(_py(code), out, timeout=60, label={"system": "x", "config": "E1"})
    assert row["status"] == "ok" and row["losses"] == [1.0]


def test_suite_survives_crashes_and_attaches_loss_diffs(tmp_path):
    def command(system, cfg, out):
        if system == "bad":
            return _py("raise MemoryError('gone')")
        losses = {"hf": [10.0, 8.0], "good": [10.0, 8.8]}[system]
        row = {"system": system, "config": cfg, "status": "ok", "losses": losses}
        return _py(f"import json; open({str(out)!r}, 'w').write(json.dumps({row!r}))")

    lines = []
    rows = runner.run_suite(["hf", "bad", "good"], ["E1"], tmp_path, timeout=60, command=command, progress=lines.append)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[1]["reason"] == "MemoryError: gone"
    assert rows[0]["loss_max_rel_diff_vs_hf"] == 0.0
    assert rows[2]["loss_max_rel_diff_vs_hf"] == pytest.approx(0.1)
    assert json.loads((tmp_path / "e2e_E1_good.json").read_text())["loss_max_rel_diff_vs_hf"] == pytest.approx(0.1)
    assert any("[2/3] E1 bad" in l for l in lines)
    # a spent budget: rows that say so, no process started
    rows = runner.run_suite(["hf"], ["E2"], tmp_path, timeout=lambda: 0, command=command)
    assert rows[0]["reason"] == "not run: time budget spent"


def test_classify_failure():
    assert classify_failure(torch.OutOfMemoryError("CUDA out of memory. Tried")).startswith("out of memory")
    assert classify_failure(ModuleNotFoundError("No module named 'liger_kernel'")).startswith("not installed")
    assert classify_failure(Unsupported("no packed input")) == "unsupported: no packed input"
    try:
        raise KeyError("k")
    except KeyError as e:
        assert classify_failure(e).startswith("KeyError: 'k' at test_bench_runner.py:")


@pytest.mark.full
def test_real_worker_subprocess_on_tiny_model(tmp_path):
    """The real worker (hf on a tiny Llama, CPU) writes an ok row with every figure."""
    rows = runner.run_suite(["hf"], ["tiny"], tmp_path, timeout=300, worker_opts={"device": "cpu", "steps": 6, "warmup": 1})
    r = rows[0]
    assert r["status"] == "ok", r.get("reason")
    assert len(r["losses"]) == 6 and all(torch.isfinite(torch.tensor(r["losses"])))
    assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0 and r["env"]["torch"]
    assert r["loss_max_rel_diff_vs_hf"] == 0.0


@pytest.mark.full
def test_padded_and_packed_train_to_the_same_losses():
    """In-process e2e on a tiny Llama: the packed batches (position_ids restarting) give the
    padded batches' losses, so packing neither leaks attention across sequences nor drops tokens."""
    base = get_config("tiny").replace(seq=256, batch=3)
    rows = {m: run_e2e("hf", base.replace(data=m), device="cpu", steps=6, warmup=1) for m in ("padded", "packed")}
    pad, pack = rows["padded"], rows["packed"]
    assert pad["real_tokens_per_step"] == pack["real_tokens_per_step"] == pack["slots_per_step"]
    assert pad["slots_per_step"] > pad["real_tokens_per_step"]  # ragged lengths: padding exists
    for a, b in zip(pad["losses"], pack["losses"]):
        assert abs(a - b) <= 2e-3 * abs(a)


def test_too_few_timed_steps_is_refused():
    with pytest.raises(ValueError, match="timed steps"):
        run_e2e("hf", get_config("tiny"), device="cpu", steps=4, warmup=3)


def test_a_stall_inside_the_timed_steps_is_named():
    """R1p's run of 2026-11-30: the last step compiled again, 4.58 s where its siblings took ~0.3;
    ragged batches differ in length, so the comparison is per real token."""
    from benchmarks.data import Batch
    from benchmarks.e2e import slowest_step

    batches = [Batch({}, [900, 1300]), Batch({}, [2000]), Batch({}, [1100, 1000]), Batch({}, [2100])]
    times = [0.30, 0.29, 0.31, 4.58]
    slow = slowest_step(times, batches, warmup=3)
    assert slow["step"] == 6 and slow["s"] == 4.58 and slow["vs_median"] > 10
    row = {"status": "ok", "tokens_per_s": 2038.0, "slowest_step": slow}
    assert "timed step 6 took 4.58 s" in runner.summarize_row(row)
    even = slowest_step([0.22, 0.20, 0.21, 0.21], batches, warmup=3)  # time in proportion to length
    assert even["vs_median"] < 1.2 and "timed step" not in runner.summarize_row({**row, "slowest_step": even})
