"""The A/B command on a tiny model (CPU): blocks alternate the setting's values, the code that reads
the setting sees each block's value, the setting comes back, and bad specifications are refused."""

from __future__ import annotations

import json

import pytest

import sloth_fx.kernels.lora_function as lora_function
from benchmarks.__main__ import main
from benchmarks.ab import parse_setting, summarize

SETTING = "sloth_fx.kernels.lora_function.HOST_BOUND_TOKENS"


@pytest.mark.full
def test_blocks_alternate_the_code_sees_each_value_and_the_setting_is_put_back(monkeypatch, tmp_path, capsys):
    """The tiny config's LoRA calls run 64 tokens: host-bound under 4096, not under 0."""
    told = []
    real = lora_function.lowrank_mm

    def spy(*args, host_bound, **kw):
        told.append(host_bound)
        return real(*args, host_bound=host_bound, **kw)

    monkeypatch.setattr(lora_function, "lowrank_mm", spy)
    original = lora_function.HOST_BOUND_TOKENS
    assert main(["ab", "--config", "tiny", "--set", f"{SETTING}=4096,0", "--blocks", "4", "--steps", "2",
                 "--device", "cpu", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ab_tiny_sloth_fx.json").read_text())
    assert [r["value"] for r in result["blocks"]] == [4096, 0, 4096, 0]
    per_block = len(told) // 4
    assert per_block > 0 and told == ([True] * per_block + [False] * per_block) * 2
    assert lora_function.HOST_BOUND_TOKENS == original
    assert all(r["tokens_per_s"] > 0 and len(r["step_times"]) == 2 and r["gpu"] is None for r in result["blocks"])
    summary = summarize(result)
    assert [(s["value"], s["blocks"]) for s in summary] == [("4096", 1), ("0", 1)]
    assert summary[0]["median_tokens_per_s"] == result["blocks"][2]["tokens_per_s"]
    assert "HOST_BOUND_TOKENS=0: median" in capsys.readouterr().out


@pytest.mark.parametrize("spec,message", [
    ("HOST_BOUND_TOKENS", "module.NAME=v1,v2"),
    (f"{SETTING}=", "module.NAME=v1,v2"),
    ("sloth_fx.kernels.lora_function.NO_SUCH=1,2", "has no 'NO_SUCH'"),
    (f"{SETTING}=1,two", "Python literals"),
    (f"{SETTING}=1", "two values or more"),
])
def test_bad_settings_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_setting(spec)


def test_packed_rows_are_refused_for_a_system_that_takes_none(monkeypatch):
    import types

    import benchmarks.ab as ab
    from benchmarks.configs import get_config
    from benchmarks.systems import Unsupported

    monkeypatch.setattr(ab, "timed_prepare", lambda *args: (types.SimpleNamespace(packed_ok=False), {}))
    with pytest.raises(Unsupported, match="takes no packed input"):
        ab.run_ab("hf", get_config("tiny", data="packed"), f"{SETTING}=4096,0", blocks=2, steps=2, device="cpu")
