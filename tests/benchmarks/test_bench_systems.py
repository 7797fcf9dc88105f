"""The sloth_fx_noce system (every pass but cross_entropy), E5's shape, and reports with it."""

import re

import pytest
import torch

import sloth_fx
from benchmarks import plots, report
from benchmarks.configs import CONFIGS, SYSTEMS, get_config
from benchmarks.data import batches_for
from benchmarks.e2e import train_steps
from benchmarks.systems import prepare


@pytest.mark.full
@pytest.mark.parametrize("system, ce_sites", [("sloth_fx", 1), ("sloth_fx_noce", 0)])
def test_noce_runs_every_pass_but_cross_entropy(system, ce_sites):
    cfg = get_config("tiny")
    prepared = prepare(system, cfg, "cpu", 0)
    train_steps(prepared, batches_for(cfg, 1, 0), torch.device("cpu"))
    rep = sloth_fx.report(prepared.model)
    assert rep.count("cross_entropy") == ce_sites
    assert rep.count("lora") > 0 and rep.count("rmsnorm") > 0
    expected = [p for p in sloth_fx.available_passes() if ce_sites or p != "cross_entropy"]
    assert prepared.notes["passes"] == expected
    after = prepared.after_training()  # what run_e2e adds to the row's notes once the steps ran
    assert after["rewrites"] == {p: rep.count(p) for p in expected}
    assert re.search(r"region LlamaDecoderLayer: .*; captured \d+ times?\n", after["explain"])
    assert "region LlamaForCausalLM head+loss" in after["explain"]  # explain is kept whole, the head's region last


def test_e5_is_llama3_8b_4x4096_ckpt():
    e5 = CONFIGS["E5"]
    s = e5.shape
    assert (s.hidden, s.layers, s.intermediate, s.heads, s.kv_heads, s.vocab) == (4096, 32, 14336, 32, 8, 128256)
    assert (e5.precision, e5.batch, e5.seq, e5.checkpointing) == ("bf16", 4, 4096, True)


def _row(system, tps):
    return {"system": system, "config": "E5", "config_desc": "E5 Llama-3-8B bf16 LoRA 4x4096 ckpt", "status": "ok",
            "tokens_per_s": tps, "peak_bytes": 30 * 1024**3, "losses": [12.0, 11.9]}


def test_reports_list_noce_between_unsloth_and_sloth_fx(tmp_path):
    assert SYSTEMS.index("sloth_fx_noce") == SYSTEMS.index("sloth_fx") - 1
    rows = [_row("sloth_fx", 5000.0), _row("hf", 3000.0), _row("sloth_fx_noce", 4000.0)]
    t = report.summary_table(rows)
    assert t.splitlines()[0] == "| config | hf | sloth_fx_noce | sloth_fx |"
    assert "| 3000 (30.00) | 4000 (30.00) | 5000 (30.00) |" in t
    d = report.detail_table(rows)
    assert [l.split("|")[2].strip() for l in d.splitlines()[2:]] == ["hf", "sloth_fx_noce", "sloth_fx"]
    paths = plots.plot_results(rows, tmp_path)
    assert {p.name for p in paths} == {"tokens_per_s.png", "peak_memory.png", "loss_E5.png"}
    no_noce = report.summary_table([r for r in rows if r["system"] != "sloth_fx_noce"])
    assert no_noce.splitlines()[0] == "| config | hf | sloth_fx |"


@pytest.mark.full
def test_offload_system_offloads_every_checkpointed_step():
    cfg = get_config("tiny", checkpointing=True, layers=6)  # more layers than offloading keeps on the device
    prepared = prepare("sloth_fx_offload", cfg, "cpu", 0)
    train_steps(prepared, batches_for(cfg, 1, 0), torch.device("cpu"))
    text = str(sloth_fx.explain(prepared.model))
    assert "activation checkpointing, offload (latest)" in text
    assert "chunked_mlp" not in prepared.notes["passes"]  # the offload alone
    plain = prepare("sloth_fx", cfg, "cpu", 0)
    train_steps(plain, batches_for(cfg, 1, 0), torch.device("cpu"))
    assert "activation checkpointing, recompute (latest)" in str(sloth_fx.explain(plain.model))
