"""Trainer runs take the fused ops' plain-PyTorch references, not the Triton interpreter.

What these tests check is how sloth_fx sits under the trainers (capture, rewrites, the loss the
trainer logs, the adapters it saves); the Triton kernels are checked against their references in
tests/kernels. Interpreted, one training step of a tiny model takes seconds, and each test runs
several.
"""

import pytest


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
