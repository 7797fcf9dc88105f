"""Running a token-wise function over chunks of tokens, each chunk under its own activation checkpoint.

``fn(x, *args)`` is *token-wise* in ``x [..., d]`` when each token of its output (a row: one index
of all dims but the last) depends on that token of ``x`` alone and on ``args``, which hold no
tokens. A decoder layer's MLP is: ``y_t = down(act(gate(x_t)) * up(x_t))``. Then for any split of
the ``N`` rows of ``x`` into consecutive chunks ``C_1, ..., C_n``

    fn(x) = cat(fn(x[C_1]), ..., fn(x[C_n]))
    dL/dx[C_k] = the gradient through fn(x[C_k]) alone
    dL/dθ = Σ_k dL/dθ|_{C_k}   for every θ in args (a weight: Σ_t over tokens, regrouped by chunk)

so the outputs and the input gradient are the unchunked values, and a weight's gradient is the
same sum of per-token terms in another grouping: it differs by rounding only. (Bit for bit, the
first two hold only where each product rounds a row alike whatever the number of rows: the CPU's
MKL rounds a few rows differently from many, and GPU libraries pick their kernels by shape.)

**Memory.** Under non-reentrant checkpointing a chunk keeps only its inputs: a view of ``x``
(``x``'s storage: nothing new) and ``args``. Its intermediates (the MLP's ``[c x intermediate]``
gate, up and product) live while the chunk runs forward and again, one chunk at a time, while its
backward recomputes them. So the peak holds one chunk's intermediates, not ``N`` tokens' worth,
forward or backward; the outputs (``N x d_out``, twice while they are concatenated) and the input
gradient are as wide as the output, not the intermediate.

**Cost.** Each chunk's forward runs once more, in its backward (in a layer that is itself
checkpointed, ``fn`` then runs three times). Where the rows fit in one chunk, ``fn`` runs as it is,
with no checkpoint: short batches pay nothing.

**When.** A rewritten graph calls :func:`chunk_in_step`, which chunks only inside a training
step that decided to (:func:`chunking`, from :mod:`sloth_fx.memory_budget`: one layer's
``[T x intermediate]`` products would take too much of the budget); elsewhere ``fn`` runs as it
is, so short steps pay nothing.

**Random numbers.** A chunk's recompute replays the random numbers of its forward
(``preserve_rng_state=True``): dropout inside ``fn`` (PEFT's ``lora_dropout``) draws the same mask
twice. The masks are drawn chunk by chunk, so they are not those one unchunked call would draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

# Tokens per chunk where a step chunks (read at each call, by the memory budget too). Large enough
# that the matrix products keep their speed, small enough that at 64K tokens the gate, up and
# product of Llama-2-7B's MLP (intermediate 11008, bf16) hold ~0.5 GiB a chunk instead of ~4 GiB.
CHUNK_TOKENS = 8192


def run_in_token_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any,
                        chunk_tokens: int) -> torch.Tensor:
    """``fn(x, *args)`` for a token-wise ``fn`` (module doc), run over chunks of ``chunk_tokens`` rows
    of ``x`` (all its dims but the last flattened), each under non-reentrant checkpointing that
    replays the RNG; ``fn(x, *args)`` itself when ``x`` has at most ``chunk_tokens`` rows."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= chunk_tokens:
        return fn(x, *args)
    if torch.is_grad_enabled():
        outs = [checkpoint(fn, chunk, *args, use_reentrant=False, preserve_rng_state=True)
                for chunk in rows.split(chunk_tokens)]
    else:  # nothing is saved for a backward: the chunks already bound the intermediates
        outs = [fn(chunk, *args) for chunk in rows.split(chunk_tokens)]
    out = torch.cat(outs)
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class ChunkedStep:
    """One training forward that runs its token-wise calls in chunks: how many calls did."""

    calls: int = 0


_CHUNKING: ContextVar[ChunkedStep | None] = ContextVar("sloth_fx_chunking", default=None)


def chunking(on: bool) -> contextlib.AbstractContextManager[ChunkedStep | None]:
    """Around one training forward: with ``on``, :func:`chunk_in_step` calls run in chunks, counted
    in the :class:`ChunkedStep` yielded (None without ``on``)."""
    return chunking_as(ChunkedStep() if on else None)


def current_chunking() -> ChunkedStep | None:
    """The step whose :func:`chunk_in_step` calls chunk now, if any."""
    return _CHUNKING.get()


@contextlib.contextmanager
def chunking_as(step: ChunkedStep | None) -> Iterator[ChunkedStep | None]:
    """``step`` is the one that chunks inside: a checkpoint's recompute, which runs in backward
    after the forward's :func:`chunking` has ended, resumes the forward's step so that it chunks
    (and saves) as the forward did."""
    token = _CHUNKING.set(step)
    try:
        yield step
    finally:
        _CHUNKING.reset(token)


def chunk_in_step(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any) -> torch.Tensor:
    """:func:`run_in_token_chunks` over chunks of ``CHUNK_TOKENS`` inside a step that chunks
    (:func:`chunking`), ``fn(x, *args)`` elsewhere."""
    step = _CHUNKING.get()
    if step is None:
        return fn(x, *args)
    step.calls += 1
    return run_in_token_chunks(fn, x, *args, chunk_tokens=CHUNK_TOKENS)
