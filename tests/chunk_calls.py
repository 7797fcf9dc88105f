"""Counting the token chunks that sloth_fx.memory.token_chunks runs, by when each ran."""

import pytest
import torch

from sloth_fx.memory import token_chunks

WHEN = ("forward", "recompute", "backward")


def count_chunk_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """From now on (until ``monkeypatch`` undoes it), the row count of each chunk that
    token_chunks runs, appended in call order to the list of when it ran: ``"forward"`` (or
    without grad), ``"recompute"`` (inside a checkpoint's recompute) or ``"backward"`` (run again
    to differentiate it)."""
    runs: dict[str, list[int]] = {when: [] for when in WHEN}
    run_chunk = token_chunks.run_chunk

    def counted(fn, chunk, args):
        when = "backward" if torch.is_grad_enabled() else "recompute" if token_chunks.recomputing() else "forward"
        runs[when].append(chunk.shape[0])
        return run_chunk(fn, chunk, args)

    monkeypatch.setattr(token_chunks, "run_chunk", counted)
    return runs


def no_runs() -> dict[str, list[int]]:
    return {when: [] for when in WHEN}
