"""The demo, run as README says (from the checkout's root): the report and the losses, with no
foreign notices and no figure it cannot measure."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.full
def test_demo_output_is_clean():
    run = subprocess.run(
        [sys.executable, "-m", "sloth_fx.demo", "--steps", "2", "--layers", "1", "--hidden", "64", "--seq", "16",
         "--vocab", "128"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert run.returncode == 0, run.stderr
    assert "rewrite sites running in the model" in run.stdout
    assert "nan" not in run.stdout and "not compared on the CPU" in run.stdout
    assert run.stderr == "", run.stderr
