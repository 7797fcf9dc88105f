"""README's "Writing a pass": the pass written there works from the text alone, and is the pass
in sloth_fx/passes/add_rmsnorm.py."""

import re
import types
from pathlib import Path

from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx
from sloth_fx.rewrite import pass_manager

ROOT = Path(__file__).parents[1]
MARKER = "<!-- writing-a-pass: the pass -->"


def readme_pass() -> str:
    """The code block right after the marker in README.md."""
    after = (ROOT / "README.md").read_text().split(MARKER, 1)[1]
    block = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
    assert block, f"no python block after {MARKER!r} in README.md"
    return block.group(1)


def test_the_readme_pass_is_the_worked_example():
    source = (ROOT / "sloth_fx" / "passes" / "add_rmsnorm.py").read_text()
    assert readme_pass().strip() == source.split("from __future__ import annotations\n", 1)[1].strip()


def test_the_readme_pass_works(scratch_passes):
    """Run as a module of its own, registered in a registry of the test's own, it rewrites a tiny
    Llama with LoRA and checkpointing without changing its loss or gradients."""
    module = types.ModuleType("readme_pass")
    exec(compile(readme_pass(), "README.md", "exec"), module.__dict__)
    assert pass_manager.get_pass("add_rmsnorm").replace.__globals__ is module.__dict__

    original = tiny_model("llama", lora=True, checkpointing=True)
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm", "add_rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    assert sloth_fx.report(optimized).count("add_rmsnorm") == 2
    assert "add_rmsnorm: rewrote post_attention_layernorm" in sloth_fx.explain(optimized)
