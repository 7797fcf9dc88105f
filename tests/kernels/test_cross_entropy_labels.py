"""Labels outside the vocabulary, and the host never waiting for the GPU in the fused cross-entropy.

Under the Triton interpreter (CPU tensors) a bad label raises ValueError at once, naming its value.
On CUDA the check is a device-side assert the host does not wait for: a training step issues no
host synchronisation, and a bad label still stops the process, with the range, the vocabulary size
and ignore_index in the message the device prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sloth_fx.kernels.cross_entropy import linear_cross_entropy
from sloth_fx.kernels.cross_entropy_reference import linear_cross_entropy_reference
from sloth_fx.kernels.toolkit import interpreting

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not interpreting(), reason="CPU tensors take the Triton path only under its interpreter "
                                               "(conftest turns it on where there is no GPU)")
@pytest.mark.parametrize("labels, first", [
    ([0, 1, 20, 3, -100, 5], 20),
    ([0, 1, 2, -1, -100, 5], -1),
    ([0, 25, 20, -1, -100, 5], 25),
], ids=["label = V", "label = -1", "first of several"])
def test_cpu_label_outside_the_vocabulary_raises_naming_it(labels, first):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g)
    message = f"linear_cross_entropy: label {first} is outside [0, 20) and is not ignore_index=-100"
    with pytest.raises(ValueError, match=re.escape(message)):
        linear_cross_entropy(hidden, weight, torch.tensor(labels))


def _cuda_inputs(n: int, h: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to("cuda", torch.bfloat16).requires_grad_()
    bias = (torch.randn(v, generator=g) * 0.5).to("cuda", torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    return hidden, weight, bias, labels.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("num_items", ["none", "int", "cuda tensor", "cpu tensor"])
def test_gpu_forward_and_backward_never_wait_for_the_gpu(num_items):
    """torch's sync debug mode turns every host synchronisation torch makes (``.item()``, ``bool()``
    of a tensor, a blocking copy, ``nonzero``, boolean indexing) into an error; the step runs
    several chunks, on valid labels."""
    n, h, v = 256, 64, 1000
    hidden, weight, bias, labels = _cuda_inputs(n, h, v)
    count = int((labels != -100).sum())
    nib = {"none": None, "int": count, "cuda tensor": torch.tensor(count, device="cuda"),
           "cpu tensor": torch.tensor(count)}[num_items]

    def step() -> torch.Tensor:
        loss = linear_cross_entropy(hidden, weight, labels, bias=bias, num_items_in_batch=nib,
                                    memory_budget_bytes=64 * v * 2)  # 64 rows a chunk: 4 chunks
        loss.backward()
        return loss

    step()  # compiles the kernels and makes cuBLAS's handles outside the check
    torch.cuda.synchronize()
    hidden.grad = weight.grad = bias.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = linear_cross_entropy_reference(hidden.detach(), weight.detach(), labels, bias=bias.detach(),
                                         num_items_in_batch=nib)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)
    assert all(torch.isfinite(t.grad).all() for t in (hidden, weight, bias))


_BAD_LABEL_STEP = """
import traceback
import torch
from sloth_fx.kernels.cross_entropy import linear_cross_entropy
hidden = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
weight = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16)
labels = torch.zeros(64, dtype=torch.long, device="cuda")
labels[5] = 1000
try:
    linear_cross_entropy(hidden, weight, labels).backward()
    print("step returned", flush=True)
    torch.cuda.synchronize()
except RuntimeError:
    traceback.print_exc()
"""


@pytest.mark.gpu
@pytest.mark.parametrize("blocking", [False, True], ids=["async", "CUDA_LAUNCH_BLOCKING"])
def test_gpu_label_outside_the_vocabulary_fails_a_device_assert(blocking):
    """In a process of its own: the assert leaves the CUDA context unusable. Asynchronously the error
    comes at the next CUDA call that reports errors (the synchronize at the latest); with
    CUDA_LAUNCH_BLOCKING=1 in the loss's forward, at the check."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_LAUNCH_BLOCKING": "1" if blocking else "0"}
    run = subprocess.run([sys.executable, "-c", _BAD_LABEL_STEP], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    output = run.stdout + run.stderr
    assert "device-side assert triggered" in output, output
    assert "linear_cross_entropy: a label is outside [0, 1000) and is not ignore_index=-100" in output, output
    if blocking:
        assert "step returned" not in output and "_check_labels_in_range" in output, output
