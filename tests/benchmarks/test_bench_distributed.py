"""The several-GPU mode on CPU: torchrun launches of 2 gloo processes and of 1, the tiny model in
fp32, 3 steps.

hf_ddp and sloth_fx_ddp only: each launch costs ~10 s on 2 cores (mostly imports), and a system
costs three launches. sloth_fx_fsdp2 runs on CPU over gloo too (by hand: its 2-process losses
matched one process's within 2e-7), and ``tests/distributed`` checks FSDP2's training itself. A
failing launch (an unknown dtype, raised on both ranks) must become a failed row with the ranks'
reason (from the rank's own report, not torchrun's).
"""

import json
import re

import pytest

from benchmarks import distributed

pytestmark = pytest.mark.full  # multi-process: run by CI's -m full step, not by default

SYSTEMS = ("hf_ddp", "sloth_fx_ddp")
PER_GPU_BATCH = 2  # the tiny configuration's batch
# fp32 sums in another order (two halves, then their mean): seen 1.3e-7 relative
RTOL = 1e-5


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread a process: a 1-process run with two threads on two busy cores is 50x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _rows(results) -> dict[tuple[str, int, int], dict]:
    rows = [json.loads(p.read_text()) for p in results.glob("dist_*.json")]
    return {(r["system"], r["processes"], r["global_batch"]): r for r in rows}


def test_two_processes_train_like_one_on_the_global_batch(tmp_path, reference_ops, one_thread):
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "float32", "--gpus", "2", "--steps", "3",
            "--warmup", "1", "--systems", ",".join(SYSTEMS), "--results", str(tmp_path), "--timeout", "120"]
    assert distributed.main(argv) == 0
    rows = _rows(tmp_path)
    assert set(rows) == {(s, p, g) for s in SYSTEMS for p, g in ((2, 4), (1, 2), (1, 4))}
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row.get("reason"))
        assert len(row["losses"]) == 3 and len(row["tokens_per_s_per_rank"]) == key[1]
        assert row["tokens_per_s_per_gpu"] > 0
    for system in SYSTEMS:
        two, whole, half = rows[system, 2, 4], rows[system, 1, 4], rows[system, 1, 2]
        assert two["losses"] == pytest.approx(whole["losses"], rel=RTOL), system
        assert half["losses"] != pytest.approx(whole["losses"], rel=RTOL), "the check tells batches apart"
        assert len(two["rank_losses"]) == 2 and two["rank_losses"][0] != two["rank_losses"][1]
    assert rows["sloth_fx_ddp", 2, 4]["notes"]["rewrites"]["lora"] > 0  # sloth_fx ran its rewrites under DDP
    table = (tmp_path / "distributed.md").read_text()
    for system in SYSTEMS:
        line = next(l for l in table.splitlines() if l.startswith(f"| {system} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        one, two = rows[system, 1, 2]["tokens_per_s_per_gpu"], rows[system, 2, 4]["tokens_per_s_per_gpu"]
        assert cells[3] == f"{two / one:.1%}"  # scaling efficiency
        assert float(cells[6]) <= RTOL and cells[7] == ""  # loss difference, no failures


def test_a_failing_rank_gives_a_failed_row_with_its_reason(tmp_path, reference_ops, one_thread):
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "no_such_dtype", "--gpus", "2", "--steps", "2",
            "--warmup", "1", "--systems", "hf_ddp", "--no-loss-check", "--results", str(tmp_path), "--timeout", "120"]
    assert distributed.main(argv) == 0
    rows = _rows(tmp_path)
    assert set(rows) == {("hf_ddp", 2, 4), ("hf_ddp", 1, 2)}
    two = rows["hf_ddp", 2, 4]
    assert two["status"] == "failed"
    # both ranks fail alike; one may be ended by torchrun before it writes its reason
    assert re.search(r"rank [01]: AttributeError", two["reason"]), two["reason"]
    assert "no_such_dtype" in (tmp_path / "distributed.md").read_text()
