"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before the package is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reference_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused ops take their plain-PyTorch references, not the Triton interpreter: for tests of
    how sloth_fx captures and runs a model (the kernels' own tests run them interpreted), where an
    interpreted step of a tiny model costs seconds."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
