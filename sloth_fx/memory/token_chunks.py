"""Running a token-wise function over chunks of tokens, each chunk's forward run again in backward.

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

**Memory.** The forward runs the chunks one after another with nothing saved but ``x`` and
``args``; the backward runs chunk ``k``'s forward again and at once its backward, with the slice
of the output gradient. So the peak holds one chunk's intermediates (the MLP's
``[c x intermediate]`` gate, up and product, and their gradients), not ``N`` tokens' worth,
forward or backward; the outputs and the input gradient are as wide as the output.

**Cost.** Each chunk's forward runs once more, in backward. In a layer that is itself
checkpointed, the layer's recompute runs ``fn`` a third time, unless the call is told that the
recompute never reads its output (``unread_width``: the output only flows into the checkpointed
function's result through sums, whose backward needs no values). Then, in the recompute
(:func:`recomputing`), the call saves its inputs and returns zeros of the output's shape
without running ``fn``: ``fn`` runs twice, as an MLP does under plain checkpointing. Where
the rows fit in one chunk, ``fn`` runs as it is: short batches pay nothing.

**When.** A rewritten graph calls :func:`chunk_in_step`, which chunks only inside a training
step that decided to (:func:`chunking`, from :mod:`sloth_fx.memory.budget`: one layer's
``[T x intermediate]`` products would take too much of the budget); elsewhere ``fn`` runs as it
is, so short steps pay nothing.

**Random numbers.** The RNG state (CPU, and each CUDA device of the inputs) is taken before the
first chunk's forward and restored once in backward, which runs the chunks' forwards in the
forward's order (a backward draws nothing): dropout inside ``fn`` (PEFT's ``lora_dropout``) draws
the same masks twice. The masks are drawn chunk by chunk, so they are not those one unchunked call
would draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

# Tokens per chunk where a step chunks (read at each call, by the memory budget too). Large enough
# that the matrix products keep their speed, small enough that at 64K tokens the gate, up and
# product of Llama-2-7B's MLP (intermediate 11008, bf16) hold ~0.5 GiB a chunk instead of ~4 GiB.
CHUNK_TOKENS = 8192


def run_in_token_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, chunk_tokens: int,
                        unread_width: int | None = None) -> torch.Tensor:
    """``fn(x, *args)`` for a token-wise ``fn`` (module doc), run over chunks of ``chunk_tokens`` rows
    of ``x`` (all its dims but the last flattened), each chunk's forward run again in backward with
    the forward's RNG; ``fn(x, *args)`` itself when ``x`` has at most ``chunk_tokens`` rows. With
    ``unread_width`` (the output's last size), a call inside a checkpoint's recompute saves its
    inputs and returns zeros of the output's shape without running ``fn``."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= chunk_tokens:
        return fn(x, *args)
    if torch.is_grad_enabled():
        skip = unread_width if _RECOMPUTE.get() else None
        return ChunksRunAgainInBackward.apply(fn, chunk_tokens, skip, x, *args)
    return _over_chunks(fn, x, args, chunk_tokens)  # no backward: nothing to save


def _over_chunks(fn: Callable[..., torch.Tensor], x: torch.Tensor, args: Sequence[Any],
                 chunk_tokens: int) -> torch.Tensor:
    """``fn`` on each chunk of ``x``'s rows in turn, the outputs joined back to ``x``'s leading shape."""
    out = torch.cat([run_chunk(fn, chunk, args) for chunk in x.reshape(-1, x.shape[-1]).split(chunk_tokens)])
    return out.view(*x.shape[:-1], out.shape[-1])


def run_chunk(fn: Callable[..., torch.Tensor], chunk: torch.Tensor, args: Sequence[Any]) -> torch.Tensor:
    """One chunk's ``fn``, in forward or again in backward (one place, which tests count)."""
    return fn(chunk, *args)


class ChunksRunAgainInBackward(torch.autograd.Function):
    """``apply(fn, chunk_tokens, unread_width, x, *args)``: ``fn(x, *args)`` chunk by chunk (module doc).

    Forward: ``y[C_k] = fn(x[C_k], *args)`` for each chunk in order, no graph kept; saved: ``x``, the
    tensors of ``args`` and the RNG state before the first chunk. In a recompute with
    ``unread_width``: saved the same, ``y`` zeros. Backward, the RNG restored once, chunk by chunk
    in order: ``y_k = fn(x[C_k], *args)`` with grad, then ``dx[C_k], dθ_k = ∂y_k/∂(x[C_k], θ) ·
    dy[C_k]``, and ``dθ = Σ_k dθ_k`` in chunk order. Each chunk draws its forward's random numbers,
    since only forwards draw and they run in the forward's order.
    """

    @staticmethod
    def forward(ctx, fn, chunk_tokens, unread_width, x, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # the tensors only as saved tensors (a checkpoint around the call frees and recomputes those)
        ctx.fn, ctx.chunk_tokens = fn, chunk_tokens
        ctx.others = [(isinstance(a, torch.Tensor), None if isinstance(a, torch.Tensor) else a) for a in args]
        ctx.devices = sorted({t.device.index for t in (x, *tensors) if t.is_cuda})
        ctx.rng = rng_state(ctx.devices)
        ctx.save_for_backward(x, *tensors)
        if unread_width is not None:
            return x.new_zeros(*x.shape[:-1], unread_width)
        return _over_chunks(fn, x, args, chunk_tokens)

    @staticmethod
    def backward(ctx, grad_out):
        x, *saved = ctx.saved_tensors
        tensors = iter(saved)
        args = [next(tensors) if is_tensor else other for is_tensor, other in ctx.others]
        needs = ctx.needs_input_grad[3:]
        rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty_like(rows) if needs[0] else None
        d_args: list[torch.Tensor | None] = [None] * len(args)
        # a tensor that needs a gradient becomes a leaf of each chunk's graph; the others (a 4-bit
        # weight keeps its quantisation state) are passed as they are
        inputs = [a.detach().requires_grad_() if need else a for a, need in zip(args, needs[1:])]
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            restore_rng(ctx.devices, ctx.rng)
            start = 0
            for chunk, grad in zip(rows.split(ctx.chunk_tokens), grad_rows.split(ctx.chunk_tokens)):
                leaf = chunk.detach().requires_grad_(needs[0])
                wanted = [t for t, need in zip([leaf, *inputs], needs) if need]
                # an input that no chunk uses gets None, as autograd gives it (an optimizer skips it)
                grads = iter(torch.autograd.grad(run_chunk(ctx.fn, leaf, inputs), wanted, grad, allow_unused=True))
                if needs[0]:
                    g = next(grads)
                    dx[start:start + chunk.shape[0]] = 0 if g is None else g
                for i, need in enumerate(needs[1:]):
                    g = next(grads) if need else None
                    if g is not None:
                        d_args[i] = g if d_args[i] is None else d_args[i] + g
                start += chunk.shape[0]
        return None, None, None, dx.view(x.shape) if dx is not None else None, *d_args


RngState = tuple[torch.Tensor, list[torch.Tensor]]


def rng_state(devices: Sequence[int]) -> RngState:
    """The CPU's RNG state and that of each CUDA device in ``devices`` (device indices)."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def restore_rng(devices: Sequence[int], state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, device_state in zip(devices, cuda):
        torch.cuda.set_rng_state(device_state, device)


@dataclass
class ChunkedStep:
    """One training forward that runs its token-wise calls in chunks: how many calls did."""

    calls: int = 0


_CHUNKING: ContextVar[ChunkedStep | None] = ContextVar("sloth_fx_chunking", default=None)
_RECOMPUTE: ContextVar[bool] = ContextVar("sloth_fx_recompute", default=False)


def chunking(on: bool) -> contextlib.AbstractContextManager[ChunkedStep | None]:
    """Around one training forward: with ``on``, :func:`chunk_in_step` calls run in chunks, counted
    in the :class:`ChunkedStep` yielded (None without ``on``)."""
    return chunking_as(ChunkedStep() if on else None)


def current_chunking() -> ChunkedStep | None:
    """The step whose :func:`chunk_in_step` calls chunk now, if any."""
    return _CHUNKING.get()


@contextlib.contextmanager
def chunking_as(step: ChunkedStep | None, recompute: bool = False) -> Iterator[ChunkedStep | None]:
    """``step`` is the one that chunks inside: a checkpoint's recompute, which runs in backward
    after the forward's :func:`chunking` has ended, resumes the forward's step (``recompute``
    true) so that it chunks and saves as the forward did."""
    token, recompute_token = _CHUNKING.set(step), _RECOMPUTE.set(recompute)
    try:
        yield step
    finally:
        _CHUNKING.reset(token)
        _RECOMPUTE.reset(recompute_token)


def recomputing() -> bool:
    """A checkpoint's recompute is running (inside :func:`chunking_as` with ``recompute``)."""
    return _RECOMPUTE.get()


def chunk_in_step(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any,
                  unread_width: int | None = None) -> torch.Tensor:
    """:func:`run_in_token_chunks` over chunks of ``CHUNK_TOKENS`` inside a step that chunks
    (:func:`chunking`), ``fn(x, *args)`` elsewhere. ``unread_width``: the output's last size, given
    where a checkpoint's recompute never reads the output (see :func:`run_in_token_chunks`)."""
    step = _CHUNKING.get()
    if step is None:
        return fn(x, *args)
    if not _RECOMPUTE.get():
        step.calls += 1
    return run_in_token_chunks(fn, x, *args, chunk_tokens=CHUNK_TOKENS, unread_width=unread_width)
