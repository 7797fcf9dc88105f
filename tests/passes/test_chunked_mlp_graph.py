"""The chunked-MLP pass on captured graphs: the MLP's intermediate activations live one chunk at a
time, forward and backward, at any token count (measured while the rewritten graph runs); and
MLPs that must not run in chunks are refused, each with its reason, the graph left as it was."""

import functools

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from tiny_models import tiny_model
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from sloth_fx.capture.regions import mark_batch_and_sequence_dynamic
from sloth_fx.memory.checkpoint import replay_rng_in_checkpoints
from sloth_fx.rewrite.pass_manager import run_pass, subgraphs
from sloth_fx.report import PassLog
from sloth_fx.memory import token_chunks
from sloth_fx.memory.token_chunks import chunk_in_step, chunking

pytestmark = pytest.mark.usefixtures("reference_ops")

CHUNK = 32


@pytest.fixture(autouse=True)
def chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", CHUNK)


def captured(module: nn.Module, x: torch.Tensor) -> list[tuple[fx.GraphModule, list]]:
    """The graphs Dynamo captures of ``module(x)``, unrewritten, each with its example inputs; the
    batch and sequence sizes symbolic and floats constant, as sloth_fx captures a region."""
    graphs = []

    def keep(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    mark_batch_and_sequence_dynamic((x,), {})
    torch.compile(module, backend=keep)(x)
    return graphs


class PeakStorage(TorchDispatchMode):
    """The most bytes held at once, while the mode is on, by storages that an op made for a tensor
    whose last dimension is ``width``; a storage counts until it is freed, whatever views it had."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width, self.peak = width, 0
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {ptr: entry for ptr, entry in self.live.items() if not entry[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.width:
                storage = t.untyped_storage()
                self.live.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def peak_intermediate(passes: list[str], tokens: int, layer_checkpointed: bool) -> int:
    """The peak bytes of the LoRA MLP's [tokens x intermediate] values over one forward and
    backward of its graph rewritten by ``passes``, run alone or as a checkpointed layer runs it."""
    mlp = tiny_model("llama", lora=True, layers=1).base_model.model.model.layers[0].mlp
    example = torch.randn(2, 8, 64)
    ((gm, example_inputs),) = captured(mlp, example)
    for name in passes:
        run_pass(gm, name)
    x = torch.randn(2, tokens // 2, 64, requires_grad=True)
    sizes = dict(zip(example.shape, x.shape))  # the symbolic sizes' placeholders take the new sizes
    args = [x if a is example else sizes[int(a)] if isinstance(a, torch.SymInt) else a for a in example_inputs]
    run = (lambda *a: checkpoint(gm, *a, use_reentrant=False)) if layer_checkpointed else gm
    with PeakStorage(mlp.up_proj.out_features) as memory, chunking(True):  # a step that chunks
        (out,) = run(*args)
        out.backward(torch.ones_like(out))
    return memory.peak


@pytest.mark.parametrize("layer_checkpointed", [False, True])
def test_intermediates_live_one_chunk_at_a_time(layer_checkpointed):
    """256 more tokens add at least three [256 x 96] values (gate, up, their product) to the
    unchunked MLP's peak and nothing to the chunked one's. That holds six [chunk x 96] values (gate,
    up, product, and their gradients in backward) and the LoRA op's weight-sized temporaries (its
    merged [64 x 96] weight at small token counts): below two chunks' worth of the six."""
    fused = ["lora", "gated_mlp"]
    unchunked = [peak_intermediate(fused, tokens, layer_checkpointed) for tokens in (256, 512)]
    chunked = [peak_intermediate([*fused, "chunked_mlp"], tokens, layer_checkpointed) for tokens in (256, 512)]
    one_chunk = CHUNK * 96 * 4
    assert unchunked[1] - unchunked[0] >= 3 * 256 * 96 * 4
    assert chunked[0] == chunked[1] <= 2 * 6 * one_chunk
    assert chunked[1] * 4 < unchunked[0]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


class PlainMLP(MLP):
    def forward(self, x):
        return self.down_proj(self.hidden(x))


class LeakingMLP(MLP):
    def forward(self, x):
        h = self.hidden(x)
        return self.down_proj(h), h


class ScaledMLP(MLP):
    def forward(self, x, scale):
        return self.down_proj(self.hidden(x) * scale)


class BrokenMLP(MLP):
    def forward(self, x):
        h = self.hidden(x)
        torch._dynamo.graph_break()
        return self.down_proj(h)


class Layer(nn.Module):
    """A residual block around an MLP; ``feed`` makes the MLP's extra input from ``x``."""

    def __init__(self, mlp: MLP, feed=None) -> None:
        super().__init__()
        self.mlp, self.feed = mlp, feed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x) if self.feed is None else self.mlp(x, self.feed(x))
        if isinstance(out, tuple):  # the intermediate is read outside the MLP
            out, h = out
            return x + out + h[..., :8]
        return x + out


REFUSED = {  # the block, where the refusal is reported, what its reason says
    "intermediate read outside": (Layer(LeakingMLP()), "mlp", ["2 values leave the MLP (h, out), not one"]),
    "a second per-token input": (Layer(ScaledMLP(), lambda x: x.norm(dim=-1, keepdim=True)), "mlp",
                                 ["2 of its inputs hold the output's tokens (l_x_, norm), not one"]),
    "an input the size of the tokens": (Layer(ScaledMLP(), lambda x: torch.arange(x.shape[1]).float()[:, None]), "mlp",
                                        ["has the tokens' size s", "each chunk would read it whole"]),
    # Dynamo captures the MLP's frame apart, up to the break: its module paths start at the MLP
    "split by a graph break": (Layer(BrokenMLP()), "", ["no down_proj in this MLP's graph (only gate_proj, up_proj)"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_with_its_reason(case):
    layer, location, reasons = REFUSED[case]
    graphs = captured(layer, torch.randn(2, 5, 8))
    gm, _ = graphs[0]
    log: PassLog = run_pass(gm, "chunked_mlp")
    (refusal,) = log.refusals
    assert refusal.location == location and all(reason in refusal.reason for reason in reasons), refusal.reason
    assert not log.rewrites and all(n.target is not chunk_in_step for n in gm.graph.nodes)
    assert not any(name.startswith("chunked_mlp_body") for name, _ in gm.named_children())


def test_a_plain_mlp_is_outlined():
    """The control for the refusals: the same block around the plain MLP is rewritten."""
    ((gm, _),) = captured(Layer(PlainMLP()), torch.randn(2, 5, 8))
    log = run_pass(gm, "chunked_mlp")
    assert [rw.location for rw in log.rewrites] == ["mlp"] and not log.refusals
    assert sum(n.target is chunk_in_step for n in gm.graph.nodes) == 1
    again = run_pass(gm, "chunked_mlp")  # named twice: the outlined MLP is not outlined again
    assert not again.rewrites and not again.refusals
    assert sum(n.target is chunk_in_step for n in gm.graph.nodes) == 1


class CheckpointedLayer(nn.Module):
    """``Layer(PlainMLP())`` under a checkpoint inside the compiled forward (a body graph), its
    output passed through ``after`` inside the checkpoint; ``context_fn`` a selective policy."""

    def __init__(self, after=lambda h: h, context_fn=None) -> None:
        super().__init__()
        self.layer, self.after = Layer(PlainMLP()), after
        self.kwargs = {} if context_fn is None else {"context_fn": context_fn}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda t: self.after(self.layer(t)), x, use_reentrant=False, **self.kwargs)


def outlined_call(block: nn.Module) -> fx.Node:
    """The chunked call of ``block``'s captured graph, after checkpoint RNG replay and the pass."""
    ((gm, _),) = captured(block, torch.randn(2, 5, 8))
    for _, graph in subgraphs(gm):
        replay_rng_in_checkpoints(graph)
    run_pass(gm, "chunked_mlp")
    (call,) = [n for _, g in subgraphs(gm) for n in g.graph.nodes if n.target is chunk_in_step]
    return call


def test_a_checkpoint_bodys_recompute_is_told_when_it_never_reads_the_mlp():
    """The call is told that the recompute never reads its output only where the graph is a whole
    checkpointed function replayed op for op and the output is only summed into its result."""
    assert outlined_call(CheckpointedLayer()).kwargs == {"unread_width": 8}
    assert outlined_call(CheckpointedLayer(after=lambda h: h * h)).kwargs == {}  # h * h saves h
    save_mm = functools.partial(create_selective_checkpoint_contexts, [torch.ops.aten.mm.default])
    assert outlined_call(CheckpointedLayer(context_fn=save_mm)).kwargs == {}  # a selective policy
    assert outlined_call(Layer(PlainMLP())).kwargs == {}  # not a checkpoint body
