"""Counting the token chunks that sloth_fx.token_chunks runs under a checkpoint."""

import pytest

from sloth_fx import token_chunks


def count_chunk_checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on (until ``monkeypatch`` undoes it), the row count of each chunk that
    run_in_token_chunks runs under a checkpoint, appended in call order to the returned list."""
    rows: list[int] = []
    checkpoint = token_chunks.checkpoint

    def counted(fn, chunk, *args, **kwargs):
        rows.append(chunk.shape[0])
        return checkpoint(fn, chunk, *args, **kwargs)

    monkeypatch.setattr(token_chunks, "checkpoint", counted)
    return rows
