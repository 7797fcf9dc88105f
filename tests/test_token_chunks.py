"""run_in_token_chunks: a token-wise function over chunks of rows, each chunk's forward run again
in backward; and inside a checkpointed layer, whose recompute runs the chunks again unless told that
it never reads their output."""

import pytest
import torch
from chunk_calls import count_chunk_runs, no_runs
from torch.utils.checkpoint import checkpoint

from sloth_fx.memory import token_chunks
from sloth_fx.memory.checkpoint import recomputed_as_forward
from sloth_fx.memory.token_chunks import chunk_in_step, chunking, run_in_token_chunks


def scaled_square(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token-wise, and exact in any grouping: products and sums of two terms, each rounded once."""
    return x * x * w + x


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    return count_chunk_runs(monkeypatch)


def test_chunks_give_the_unchunked_values(runs):
    """3 x 7 = 21 rows in chunks of 5: the output and dx bit for bit; dw (a sum over rows) in
    another grouping, within rounding; the last chunk is the remainder."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 6, generator=gen, requires_grad=True)
    w = torch.randn(6, generator=gen, requires_grad=True)
    cotangent = torch.randn(3, 7, 6, generator=gen)
    out = run_in_token_chunks(scaled_square, x, w, chunk_tokens=5)
    dx, dw = torch.autograd.grad(out, (x, w), cotangent)
    out_ref = scaled_square(x, w)
    dx_ref, dw_ref = torch.autograd.grad(out_ref, (x, w), cotangent)
    assert runs == {**no_runs(), "forward": [5, 5, 5, 5, 1], "backward": [5, 5, 5, 5, 1]}
    assert out.shape == x.shape and torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-6)


def test_an_input_no_chunk_uses_gets_no_gradient():
    """As autograd gives it: None, which an optimizer skips (a zero would still decay the weight)."""
    x, w, unused = (torch.randn(*shape, requires_grad=True) for shape in ((9, 3), (3,), (3,)))
    out = run_in_token_chunks(lambda t, a, b: scaled_square(t, a), x, w, unused, chunk_tokens=4)
    out.sum().backward()
    assert unused.grad is None and w.grad is not None and x.grad is not None


def test_rows_that_fit_in_a_chunk_run_as_they_are(runs):
    x = torch.randn(2, 4, 3, requires_grad=True)
    w = torch.randn(3)
    assert torch.equal(run_in_token_chunks(scaled_square, x, w, chunk_tokens=8), scaled_square(x, w))
    assert runs == no_runs()


def test_without_grad_the_chunks_run_once(runs):
    x, w = torch.randn(10, 3), torch.randn(3)
    with torch.no_grad():
        out = run_in_token_chunks(scaled_square, x, w, chunk_tokens=4)
    assert torch.equal(out, scaled_square(x, w)) and runs == {**no_runs(), "forward": [4, 4, 2]}


def dropout_replay_case(device: str) -> None:
    """The gradient belongs to the masks of the forward: each chunk's run in backward draws them again."""
    x = torch.randn(12, 8, device=device, requires_grad=True)

    def dropped(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(t, 0.5, True) * t

    torch.manual_seed(5)
    out = run_in_token_chunks(dropped, x, chunk_tokens=5)
    (dx,) = torch.autograd.grad(out.sum(), x)
    torch.manual_seed(5)  # the same masks, chunk by chunk, with nothing recomputed
    out_ref = torch.cat([dropped(chunk) for chunk in x.split(5)])
    (dx_ref,) = torch.autograd.grad(out_ref.sum(), x)
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)


def test_dropout_is_replayed_in_backward():
    dropout_replay_case("cpu")


@pytest.mark.gpu
def test_gpu_dropout_is_replayed_in_backward():
    """The CUDA generator's state is the one restored there."""
    dropout_replay_case("cuda")


def residual_layer(read_after: bool, unread: bool):
    """A checkpointable layer ``h = x + chunked(x * x * w + x)``, then ``h`` (only summed into the
    output) or ``h * h`` (a product, which saves ``h`` for backward); ``unread`` tells the chunked
    call that the recompute never reads its output."""
    def layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = x + chunk_in_step(scaled_square, x, w, unread_width=x.shape[-1] if unread else None)
        return h * h if read_after else h
    return layer


@pytest.fixture
def chunks_of_5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", 5)


def layer_grads(read_after: bool, unread: bool, checkpointed: str | None, chunk: bool = True):
    """Loss and gradients of ``residual_layer`` on fixed inputs (21 rows), under a reentrant or
    non-reentrant checkpoint (or none), in a step that chunks (or not)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 6, generator=gen, requires_grad=True)
    w = torch.randn(6, generator=gen, requires_grad=True)
    layer = residual_layer(read_after, unread)
    with chunking(chunk):
        if checkpointed is None:
            out = layer(x, w)
        else:
            out = checkpoint(recomputed_as_forward(layer), x, w, use_reentrant=checkpointed == "reentrant")
    loss = out.square().sum()
    loss.backward()  # not autograd.grad: a reentrant checkpoint refuses it
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("checkpointed", ["non-reentrant", "reentrant"])
def test_a_recompute_that_never_reads_the_output_does_not_run_the_chunks(checkpointed, runs, chunks_of_5):
    """Told that the output is unread, the layer's recompute runs no chunk, and the loss and the
    gradients are those of the recompute that runs them, and of the layer not checkpointed."""
    skipped = layer_grads(read_after=False, unread=True, checkpointed=checkpointed)
    assert runs == {**no_runs(), "forward": [5, 5, 5, 5, 1], "backward": [5, 5, 5, 5, 1]}
    rerun = layer_grads(read_after=False, unread=False, checkpointed=checkpointed)
    assert runs["recompute"] == [5, 5, 5, 5, 1]
    plain = layer_grads(read_after=False, unread=False, checkpointed=None)
    for got, want, other in zip(skipped, rerun, plain):
        assert torch.equal(got, want) and torch.equal(got, other)


def test_the_output_read_after_the_call_needs_the_recompute_to_run_it(chunks_of_5):
    """The control: where the recompute saves a value made from the output (``h * h``), telling
    the call that it is unread gives wrong gradients, so the pass's check is what keeps it exact."""
    right = layer_grads(read_after=True, unread=False, checkpointed="non-reentrant")
    wrong = layer_grads(read_after=True, unread=True, checkpointed="non-reentrant")
    assert torch.equal(right[0], wrong[0]) and not torch.allclose(right[1], wrong[1])


def test_outside_a_chunking_step_the_call_is_the_function(runs, chunks_of_5):
    assert torch.equal(layer_grads(read_after=True, unread=True, checkpointed="non-reentrant", chunk=False)[1],
                       layer_grads(read_after=True, unread=False, checkpointed=None, chunk=False)[1])
    assert runs == no_runs()
