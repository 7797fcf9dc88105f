"""``accelerate launch --multi_gpu --num_processes 2`` of a Trainer script on CPU: accelerate hands
the two processes to torchrun and Trainer joins them over gloo (no CUDA). The script with
``sloth_fx.optimize`` logs the losses of the one without, fp32, within 1e-5, and its rewrites ran.
Two launches, ~20 s each on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.full  # multi-process: run by CI's -m full step, not by default

SCRIPT = Path(__file__).with_name("trainer_script.py")
# fp32, the same sums in the same order but for sloth_fx's own kernels (seen: 1e-8 relative)
RTOL = 1e-5


def _launch(out: Path, *script_args: str) -> dict:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(SCRIPT), str(out), *script_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_trainer_under_accelerate_logs_the_losses_of_the_plain_model(tmp_path, reference_ops, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    plain = _launch(tmp_path / "plain.json")
    optimized = _launch(tmp_path / "optimized.json", "--optimize")
    assert plain["world_size"] == optimized["world_size"] == 2
    assert len(plain["losses"]) == 3
    assert optimized["losses"] == pytest.approx(plain["losses"], rel=RTOL)
    assert optimized["rewrites"]["lora"] > 0 and optimized["rewrites"]["cross_entropy"] == 1
