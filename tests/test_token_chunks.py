"""run_in_token_chunks: a token-wise function over chunks of rows, each chunk checkpointed."""

import pytest
import torch
from chunk_calls import count_chunk_checkpoints

from sloth_fx.token_chunks import run_in_token_chunks


def scaled_square(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token-wise, and exact in any grouping: products and sums of two terms, each rounded once."""
    return x * x * w + x


@pytest.fixture
def checkpoints(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return count_chunk_checkpoints(monkeypatch)


def test_chunks_give_the_unchunked_values(checkpoints):
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
    assert checkpoints == [5, 5, 5, 5, 1]
    assert out.shape == x.shape and torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-6)


def test_rows_that_fit_in_a_chunk_run_as_they_are(checkpoints):
    x = torch.randn(2, 4, 3, requires_grad=True)
    w = torch.randn(3)
    assert torch.equal(run_in_token_chunks(scaled_square, x, w, chunk_tokens=8), scaled_square(x, w))
    assert checkpoints == []


def test_without_grad_the_chunks_run_without_checkpoints(checkpoints):
    x, w = torch.randn(10, 3), torch.randn(3)
    with torch.no_grad():
        out = run_in_token_chunks(scaled_square, x, w, chunk_tokens=4)
    assert torch.equal(out, scaled_square(x, w)) and checkpoints == []


def test_dropout_is_replayed_in_each_recompute():
    """The gradient belongs to the masks of the forward: each chunk's recompute draws them again."""
    x = torch.randn(12, 8, requires_grad=True)

    def dropped(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(t, 0.5, True) * t

    torch.manual_seed(5)
    out = run_in_token_chunks(dropped, x, chunk_tokens=5)
    (dx,) = torch.autograd.grad(out.sum(), x)
    torch.manual_seed(5)  # the same masks, chunk by chunk, with nothing recomputed
    out_ref = torch.cat([dropped(chunk) for chunk in x.split(5)])
    (dx_ref,) = torch.autograd.grad(out_ref.sum(), x)
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
