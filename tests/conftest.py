"""Test set-up: without a GPU the Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, and
every kernel module is imported right after: a test that first imported one under
``reference_ops`` (which sets it to 0) would define its kernels compiled for good, and a later
interpreted test would fail to launch them ("0 active drivers"), depending on the order of tests.
"""

import importlib
import os
import pkgutil

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sloth_fx.kernels  # noqa: E402  (after TRITON_INTERPRET)

for _module in pkgutil.iter_modules(sloth_fx.kernels.__path__):
    importlib.import_module(f"sloth_fx.kernels.{_module.name}")


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


@pytest.fixture
def scratch_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes a test registers stay its own: a new name joins the default passes, and a deliberately
    wrong one left there would run in every later test's default optimize."""
    from sloth_fx.rewrite import pass_manager

    for name in pass_manager.available_passes() + pass_manager.OPT_IN:  # built-ins register in the real registry
        pass_manager.get_pass(name)
    monkeypatch.setattr(pass_manager, "_REGISTRY", dict(pass_manager._REGISTRY))
    monkeypatch.setattr(pass_manager, "PASS_ORDER", list(pass_manager.PASS_ORDER))
