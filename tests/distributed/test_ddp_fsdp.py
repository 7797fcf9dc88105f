"""Two CPU processes over gloo train a LoRA model under DDP and FSDP2 as one process trains it on the
whole batch: same loss at each of three SGD steps and same adapters after them, fp32, with
sloth_fx.optimize called before wrapping, after it, or not at all (the control, which shows that
the comparison itself holds). An optimized model also runs the rewrites, and the activation
checkpoints, that it runs in one process. Each test spawns two processes that train all three in
turn.
"""

from __future__ import annotations

import pytest
import torch
from two_rank_training import CHUNK_TOKENS, ORDERS, Result, Wrapper, adapters, lora_llama, one_process, two_ranks

pytestmark = pytest.mark.full  # multi-process: run by CI's -m full step, not by default

# fp32 sums in another order (two halves, then their mean): a few roundings apart (seen: 1e-7
# relative on the losses, 1e-8 absolute on the adapters)
RTOL, ATOL = 1e-5, 1e-7


@pytest.mark.parametrize("wrapper, checkpointing", [("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True)])
def test_two_ranks_train_like_one_process(wrapper: Wrapper, checkpointing: bool, reference_ops: None) -> None:
    results = two_ranks(wrapper, checkpointing)
    expected = one_process(optimized=False, checkpointing=False)
    rewritten = one_process(optimized=True, checkpointing=checkpointing)
    _assert_training_moved(expected)
    assert (rewritten["checkpoints"] > 0) == checkpointing
    for when in ORDERS:  # the control (never optimized) first
        label = f"{wrapper}, optimize {when or 'never'}"
        _assert_same_training(results[when], expected, label)
        if when is not None:
            assert results[when]["sites"] == rewritten["sites"], f"{label}: other rewrites than in one process"
            assert results[when]["checkpoints"] == rewritten["checkpoints"], f"{label}: activation checkpoints"


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_two_ranks_whose_steps_chunk_their_mlps_train_like_one_process(wrapper: Wrapper, reference_ops: None) -> None:
    """A budget of 0 bytes: each rank's checkpointed steps run their MLPs over chunks of tokens,
    whose gradients are taken inside backward and reach DDP's and FSDP2's hooks as any other."""
    results = two_ranks(wrapper, checkpointing=True, memory_budget=0)
    expected = one_process(optimized=False, checkpointing=False)
    for when in ORDERS[1:]:
        label = f"{wrapper}, optimize {when}, chunked"
        _assert_same_training(results[when], expected, label)
        (decision,) = results[when]["decisions"].values()
        assert f"MLPs run over chunks of {CHUNK_TOKENS} tokens" in decision, decision
        assert "this forward ran 2 MLPs over chunks of tokens" in decision, decision


def _assert_same_training(result: Result, expected: Result, label: str) -> None:
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected["losses"]), rtol=RTOL, atol=ATOL,
                               msg=lambda m: f"{label}, losses: {m}")
    assert result["adapters"].keys() == expected["adapters"].keys(), label
    for name, tensor in expected["adapters"].items():
        torch.testing.assert_close(result["adapters"][name], tensor, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{label}, {name}: {m}")


def _assert_training_moved(expected: Result) -> None:
    """The untrained adapters fail the comparison with the trained ones: it tells steps apart."""
    initial = adapters(lora_llama(checkpointing=False))
    for name, tensor in expected["adapters"].items():
        assert not torch.allclose(initial[name], tensor, rtol=RTOL, atol=ATOL), name
