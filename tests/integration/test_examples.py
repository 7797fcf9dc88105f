"""The CPU examples run end to end (one step, tiny random model) and print what they promise.

sft_packing_jsonl is left to test_sft.py's packing run (the same trainer and mode): on its own it
takes some 20 s here, most of it TRL's dataset preparation and the checkpointed captures."""

import importlib
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.mark.parametrize("name", ["dpo", "save_merge_generate"])
def test_example_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(name)
    result = module.main(["--steps", "1", "--output", str(tmp_path / "out")])
    if name == "save_merge_generate":
        assert result.startswith("the sloth")
    else:
        assert len(result) == 1 and math.isfinite(result[0])
        assert "rewrite sites running in the model: chunked_mlp 2, gated_mlp 2, lora 14, rmsnorm 5, rope 4" in capsys.readouterr().out
    sys.modules.pop(name)
