"""``python -m benchmarks sft`` on CPU: TRL's SFTTrainer (padding_free=True) on the tiny model, each
system in its own worker; rows of the e2e shape that the report puts in its tables."""

import json

import pytest
import torch

from benchmarks.__main__ import main

SYSTEMS = ("hf", "sloth_fx", "unsloth")  # unsloth cannot run on a CPU: not installed, or no accelerator
STEPS = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    d = tmp_path_factory.mktemp("sft")
    rc = main(["sft", "--config", "tiny", "--systems", ",".join(SYSTEMS), "--device", "cpu", "--steps", str(STEPS),
               "--warmup", "1", "--allow-few-steps", "--timeout", "120", "--results", str(d)])
    assert rc == 0
    return d, {s: json.loads((d / f"sft_tiny_{s}.json").read_text()) for s in SYSTEMS}


@pytest.mark.full
def test_hf_and_sloth_fx_train_the_same_model_on_the_same_data(results):
    _, rows = results
    hf, fx = rows["hf"], rows["sloth_fx"]
    for r in (hf, fx):
        assert r["status"] == "ok", r.get("reason")
        assert r["config"] == "SFT-pf/tiny" and r["config_desc"].startswith("SFTTrainer padding_free tiny")
        assert len(r["losses"]) == len(r["step_times"]) == STEPS
        assert r["real_tokens_per_step"] > 0 and r["real_tokens_per_s"] > 0
        # padding-free: every position the model computed on is a real token
        assert r["slots_per_step"] == r["real_tokens_per_step"]
        assert r["notes"]["padding_free"] is True
        # TRL's chunked head computes the loss, whatever the system patched on the causal LM
        assert "add_fused_lm_head" in r["notes"]["loss_forward"]
    assert abs(fx["losses"][0] - hf["losses"][0]) <= 1e-4 * abs(hf["losses"][0])
    assert fx["loss_max_rel_diff_vs_hf"] < 1e-2
    # the row reports what ran: explain says that sloth_fx's fused cross-entropy did not
    assert "add_fused_lm_head" in fx["notes"]["explain"] and fx["notes"]["rewrites"]["cross_entropy"] == 0


@pytest.mark.full
def test_a_system_that_cannot_run_fails_its_own_row(results):
    d, rows = results
    r = rows["unsloth"]
    assert r["status"] == "failed" and r["reason"] and r["config"] == "SFT-pf/tiny"
    report = (d / "report.md").read_text()
    assert "SFTTrainer padding_free tiny" in report and "failed:" in report


def test_step_batches_joins_micro_batches_and_refuses_a_batch_recorded_twice():
    from benchmarks.data import Batch
    from benchmarks.sft import step_batches

    fed = [Batch({"input_ids": torch.arange(n)[None] + 10 * n}, [n]) for n in (3, 4, 5, 6)]
    assert step_batches(fed, 4) == fed
    joined = step_batches(fed, 2)
    assert [b.lengths for b in joined] == [[3, 4], [5, 6]] and [b.slots for b in joined] == [7, 11]
    assert step_batches(fed, 3) is None
    assert step_batches([fed[0], fed[0], fed[1], fed[1]], 2) is None
