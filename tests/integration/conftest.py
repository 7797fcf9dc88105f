"""Trainer runs take the fused ops' plain-PyTorch references (tests/conftest.py's ``reference_ops``).

What these tests check is how sloth_fx sits under the trainers (capture, rewrites, the loss the
trainer logs, the adapters it saves); the Triton kernels are checked against their references in
tests/kernels.
"""

import pytest


@pytest.fixture(autouse=True)
def _reference_ops(reference_ops: None) -> None:
    """Every test here."""
