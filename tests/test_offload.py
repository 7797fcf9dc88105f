"""Offloaded activation checkpointing: each checkpointed layer's saved inputs wait in host memory.

Offload on and off give the same loss and gradients bit for bit (the copies are exact and the
recompute replays the RNG); what moves is the checkpointed layers' own inputs, each leaving when
the next layer starts and coming back one layer ahead of its recompute, with a bounded number of
copies alive.
"""

import weakref

import pytest
import torch
from torch import nn

from sloth_fx import offload
from sloth_fx.checkpoint import checkpoint_body


def assert_bitwise_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.equal(loss_a, loss_b), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


# --- the mechanism, on a chain of checkpointed layers ---------------------------------------------

class Layer:
    """A checkpointed body: ``dropout(tanh(x @ w)) * cos + bias``; ``seen`` is called at each run."""

    meta: dict = {}

    def __init__(self, seen=lambda: None):
        self.seen = seen

    def __call__(self, x, w, cos, bias=0.0):
        self.seen()
        return nn.functional.dropout(torch.tanh(x @ w), p=0.2, training=True) * cos + bias


def chain(layers=6, tokens=5, hidden=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    weights = [nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden**0.5) for _ in range(layers)]
    cos = torch.rand(tokens, hidden, generator=gen)  # shared by every layer, as rotary cos/sin are
    return x, weights, cos


def run_chain(x, weights, cos, offloaded, body=None, after_layer=lambda step, k: None, seed=3):
    """Loss and gradients (of x and every weight) of the chain, with or without an offload step."""
    body = body or Layer()
    torch.manual_seed(seed)
    with offload.offloading(offloaded) as step:
        h = x
        for k, w in enumerate(weights):
            h = checkpoint_body(body, h, w, cos)
            after_layer(step, k)
    loss = h.square().sum()
    grads = torch.autograd.grad(loss, [x, *weights])
    return loss.detach(), dict(enumerate(grads)), step


def test_chain_offloaded_is_bit_exact_and_moves_each_input_when_the_next_layer_starts():
    x, weights, cos = chain()
    where = []

    def after_layer(step, k):  # layer k has run: every earlier layer's input is in host memory, its own not
        where.append([layer.inputs[0].on_device is None for layer in step.layers])

    *plain, none = run_chain(x, weights, cos, offloaded=False)
    *moved, step = run_chain(x, weights, cos, offloaded=True, after_layer=after_layer)
    assert none is None
    assert_bitwise_same(plain, moved)
    assert where == [[True] * k + [False] for k in range(len(weights))]
    n = len(weights)
    assert step.log == [("offload", k) for k in range(n - 1)] + [("prefetch", k) for k in reversed(range(n - 1))]
    # what each layer saved: its hidden input (moved), its weight and the shared cos (kept where they are)
    for layer in step.layers:
        hidden, weight, shared = layer.inputs
        assert hidden.movable and not weight.movable and weight.on_device is not None
        assert shared is step.layers[0].inputs[2] and shared.on_device is not None
    # the dropout masks are really random: another seed gives another loss
    assert not torch.equal(run_chain(x, weights, cos, offloaded=True, seed=4)[0], moved[0])


def test_a_bounded_number_of_copies_is_alive_whatever_the_depth(monkeypatch):
    copies: list[weakref.ref] = []
    fetch = offload.SavedInput.fetch

    def recorded_fetch(self, stream):
        copy, event = fetch(self, stream)
        copies.append(weakref.ref(copy.untyped_storage()))
        return copy, event

    monkeypatch.setattr(offload.SavedInput, "fetch", recorded_fetch)
    alive_at_recompute: list[int] = []
    forward_done: list[bool] = []
    x, weights, cos = chain(layers=10)

    def count_copies():  # as a layer starts: in backward, that is its recompute
        if forward_done:
            alive_at_recompute.append(sum(r() is not None for r in copies))

    def after_layer(step, k):
        if k == len(weights) - 1:
            forward_done.append(True)

    run_chain(x, weights, cos, offloaded=True, body=Layer(seen=count_copies), after_layer=after_layer)
    assert len(alive_at_recompute) == len(weights) and len(copies) == len(weights) - 1
    # the recomputing layer's own copies and the next layer's, prefetched
    assert max(alive_at_recompute) <= 2
    assert all(r() is None for r in copies)


def test_a_backward_from_the_middle_fetches_what_was_not_prefetched_and_stays_exact():
    x, weights, cos = chain(layers=5)

    def middle(offloaded):
        torch.manual_seed(3)
        outputs = []
        with offload.offloading(offloaded) as step:
            h = x
            for w in weights:
                h = checkpoint_body(Layer(), h, w, cos)
                outputs.append(h)
        loss = outputs[2].square().sum()  # layers 3 and 4 take no part
        first = torch.autograd.grad(loss, [x, *weights[:3]], retain_graph=True)
        second = torch.autograd.grad(loss, [x, *weights[:3]])  # the host copies serve a second backward
        return first, second, step

    first, second, step = middle(True)
    plain_first, plain_second, _ = middle(False)
    for got, want in zip((*first, *second), (*plain_first, *plain_second)):
        assert torch.equal(got, want)
    backward = step.log[4:]
    assert backward == [("fetch", 2), ("prefetch", 1), ("prefetch", 0)] * 2


@pytest.mark.parametrize("layout", ["slice", "expanded"])
def test_views_and_expanded_tensors_stay_where_they_are(layout):
    x, weights, cos = chain(layers=3)
    tokens, hidden = cos.shape
    if layout == "slice":  # a view into a wider buffer: moving it would free nothing
        extra = torch.rand(tokens, 2 * hidden)[:, hidden:]
    else:  # one row seen at every token: moving it would copy it once a token
        extra = torch.rand(1, hidden).expand(tokens, hidden)
    with offload.offloading(True) as step:
        h = x
        for w in weights:
            h = checkpoint_body(Layer(), h, w, cos, extra)
    assert all(not layer.inputs[3].movable and layer.inputs[3].on_device is not None for layer in step.layers)
    assert step.log == [("offload", 0), ("offload", 1)]


def test_an_input_changed_in_place_while_on_the_device_raises():
    x, weights, cos = chain(layers=3)
    with offload.offloading(True):
        h = x
        for w in weights:
            h = checkpoint_body(Layer(), h, w, cos)
    with torch.no_grad():
        cos.mul_(2)  # shared by every layer, so never moved
    with pytest.raises(RuntimeError, match="changed in place after its checkpoint saved it"):
        h.sum().backward()


# --- on a GPU: pinned memory, streams, device memory ----------------------------------------------

def cuda_chain(layers, mib):
    """A chain whose hidden state is ``mib`` MiB, with small weights, on the GPU."""
    hidden = 256
    x, weights, cos = chain(layers=layers, tokens=mib * 2**20 // (4 * hidden), hidden=hidden)
    return (x.detach().cuda().requires_grad_(), [nn.Parameter(w.detach().cuda()) for w in weights], cos.cuda())


@pytest.mark.gpu
def test_gpu_offload_is_exact_pinned_and_prefetched():
    x, weights, cos = cuda_chain(layers=6, mib=8)
    *plain, _ = run_chain(x, weights, cos, offloaded=False)
    *moved, step = run_chain(x, weights, cos, offloaded=True)
    assert_bitwise_same(plain, moved)
    n = len(weights)
    assert step.log == [("offload", k) for k in range(n - 1)] + [("prefetch", k) for k in reversed(range(n - 1))]
    for layer in step.layers[:-1]:
        hidden = layer.inputs[0]
        assert hidden.host.is_pinned() and hidden.on_device is None and isinstance(hidden.copied, torch.cuda.Event)


@pytest.mark.gpu
def test_gpu_memory_holds_a_fixed_number_of_layer_inputs():
    layers, mib = 16, 32
    size = mib * 2**20
    x, weights, cos = cuda_chain(layers=layers, mib=mib)
    base = torch.cuda.memory_allocated()
    peaks = {}
    for offloaded in (False, True):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        after_forward = []

        def after_layer(step, k):
            if k == layers - 1:
                torch.cuda.synchronize()
                after_forward.append(torch.cuda.memory_allocated() - base)

        run_chain(x, weights, cos, offloaded=offloaded, after_layer=after_layer)
        torch.cuda.synchronize()
        peaks[offloaded] = (after_forward[0], torch.cuda.max_memory_allocated() - base)
    (kept_plain, peak_plain), (kept_moved, peak_moved) = peaks[False], peaks[True]
    assert kept_plain >= (layers - 1) * size  # every layer's input but the first (counted in base), the output
    assert kept_moved <= 4 * size  # the last layer's input, the output, and copies still in flight
    assert peak_moved <= peak_plain - (layers - 8) * size  # three inputs kept and the recompute's own, not all
