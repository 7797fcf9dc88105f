"""The chunked-MLP pass on tiny models: in a step whose budget calls for it (here a budget of 0
bytes) each layer's MLP runs over chunks of tokens, with the loss and input gradients of the
unchunked run and parameter gradients as close to a float64 run as its; the same masks as an eager
model chunked alike under lora_dropout; offloading changes no number; short rows and steps that do
not chunk run as without the pass; on by default; the sites and a refusal in the report (the
memory bound and the other refusals: test_chunked_mlp_graph.py)."""

import types

import pytest
import torch
from chunk_calls import count_chunk_runs, no_runs
from tiny_models import assert_refused_unchanged, batch, tiny_model, twin
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

import sloth_fx
from sloth_fx.memory import token_chunks
from sloth_fx.memory.budget import estimate_activations

pytestmark = pytest.mark.usefixtures("reference_ops")

CHUNK = 16
EPS = torch.finfo(torch.float32).eps
CHUNKING = 0  # a memory budget of 0 bytes: every step offloads and chunks


def without_chunking() -> list[str]:
    return [p for p in sloth_fx.available_passes() if p != "chunked_mlp"]


@pytest.fixture(autouse=True)
def chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", CHUNK)


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    return count_chunk_runs(monkeypatch)


def step(model: nn.Module, inputs: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """Loss, the gradient of the input embeddings and of every trainable parameter, for one step."""
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().to(dtype).requires_grad_()
    model.zero_grad(set_to_none=True)
    loss = model(inputs_embeds=embeds, labels=inputs["labels"]).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), embeds.grad, grads


def error(x: torch.Tensor, truth: torch.Tensor) -> float:
    """``||x - t|| / ||t||``: a sum over chunks is judged as a whole, not elementwise."""
    return ((x.double() - truth).norm() / truth.norm()).item()


def assert_as_close_to_float64(x: torch.Tensor, unchunked: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """No further from the float64 value than the unchunked run is, but for a rounding's worth."""
    chunked_error, unchunked_error = error(x, truth), error(unchunked, truth)
    assert chunked_error <= 2 * unchunked_error + EPS, f"{what}: {chunked_error} vs {unchunked_error}"


@pytest.mark.parametrize("family", ["llama", "mistral", "olmo2"])
def test_same_training_step_as_unchunked(family, runs):
    """2 rows of 37 tokens, 5 chunks a layer (the last of 10): the loss and the input gradient of
    the unchunked run up to rounding, every gradient as close to float64 as the unchunked one. The
    chunks run in the forward, in the layer's recompute (sloth_fx's checkpoint lies around the
    captured layer) and again in backward."""
    original = tiny_model(family, lora=True, checkpointing=True)
    unchunked = sloth_fx.optimize(twin(original), passes=without_chunking())
    chunked = sloth_fx.optimize(twin(original), memory_budget=CHUNKING)
    inputs = batch(s=37)
    loss, embeds_grad, grads = step(chunked, inputs)
    both_layers = [16, 16, 16, 16, 10] * 2
    assert runs == {"forward": both_layers, "recompute": both_layers, "backward": both_layers}
    assert "not run again in the layer's recompute" not in sloth_fx.explain(chunked)
    loss_u, embeds_grad_u, grads_u = step(unchunked, inputs)
    loss_t, embeds_grad_t, grads_t = step(twin(original).double(), inputs, torch.float64)
    # A row's product rounds alike in any number of rows only where the BLAS makes it so (MKL's
    # small-row kernels do not): the same values, up to rounding, not bit for bit.
    torch.testing.assert_close(loss, loss_u, rtol=1e-6, atol=0)
    torch.testing.assert_close(embeds_grad, embeds_grad_u, rtol=1e-5, atol=1e-7)
    assert_as_close_to_float64(embeds_grad, embeds_grad_u, embeds_grad_t, "input gradient")
    assert grads.keys() == grads_u.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(grads[name], grads_u[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
        assert_as_close_to_float64(grads[name], grads_u[name], grads_t[name], name)
    assert "this forward ran 2 MLPs over chunks of tokens" in sloth_fx.explain(chunked)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_steps_that_do_not_chunk_run_the_mlp_as_it_was(checkpointing, runs):
    """Without a budget (CPU) or without checkpointing the step does not chunk: no chunk's
    checkpoint, and every number as without the pass."""
    original = tiny_model("llama", lora=True, checkpointing=checkpointing)
    outlined = sloth_fx.optimize(twin(original), memory_budget=None if checkpointing else CHUNKING)
    plain = sloth_fx.optimize(twin(original), passes=without_chunking())
    loss, embeds_grad, grads = step(outlined, batch(s=37))
    loss_p, embeds_grad_p, grads_p = step(plain, batch(s=37))
    assert runs == no_runs() and sloth_fx.report(outlined).count("chunked_mlp") == 2
    assert torch.equal(loss, loss_p) and torch.equal(embeds_grad, embeds_grad_p)
    assert all(torch.equal(grads[name], grads_p[name]) for name in grads_p)


def test_a_recompute_chunks_as_its_forward_did_with_another_model_trained_in_between(runs):
    """Model A's step chunks, model B's (no budget) does not; B runs forward and backward between
    A's forward and A's backward: A's recompute still chunks (and saves) as A's forward did."""
    original = tiny_model("llama", lora=True, checkpointing=True)
    a, b = sloth_fx.optimize(twin(original), memory_budget=CHUNKING), sloth_fx.optimize(twin(original))
    inputs = batch(s=37)

    def grads(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    a(**inputs).loss.backward()
    alone = grads(a)
    a.zero_grad(set_to_none=True)
    loss = a(**inputs).loss
    b(**inputs).loss.backward()
    for when in runs:
        del runs[when][:]
    loss.backward()
    # each layer's recompute saved what the forward's chunked call saved, and its backward ran the chunks
    assert runs["backward"] == [16, 16, 16, 16, 10] * 2, runs
    assert all(torch.equal(g, alone[n]) for n, g in grads(a).items())


def run_mlps_in_chunks(model: nn.Module, chunk: int) -> None:
    """Make each MLP of ``model`` (eager) run its rows chunk by chunk, as the pass does."""
    for name, mlp in model.named_modules():
        if name.endswith(".mlp"):
            def forward(self, x, whole=mlp.forward):
                out = torch.cat([whole(rows) for rows in x.reshape(-1, x.shape[-1]).split(chunk)])
                return out.view(*x.shape[:-1], out.shape[-1])
            mlp.forward = types.MethodType(forward, mlp)


def seeded(model: nn.Module, inputs: dict[str, torch.Tensor], seed: int):
    torch.manual_seed(seed)
    return step(model, inputs)


def test_lora_dropout_replays_its_masks_in_each_chunk(monkeypatch):
    """With lora_dropout under checkpointing, the masks are drawn chunk by chunk: the step is the
    one of the eager model whose MLPs run chunk by chunk, and each chunk's recompute draws its
    forward's masks again (without the replay the gradients are another step's)."""
    original = tiny_model("llama", lora=True, lora_dropout=0.1, checkpointing=True)
    chunked = sloth_fx.optimize(twin(original), memory_budget=CHUNKING)
    reference = twin(original)
    run_mlps_in_chunks(reference, CHUNK)
    inputs = batch(s=37)
    for seed in (7, 8):
        loss, embeds_grad, grads = seeded(chunked, inputs, seed)
        loss_ref, embeds_grad_ref, grads_ref = seeded(reference, inputs, seed)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(embeds_grad, embeds_grad_ref, rtol=1e-5, atol=1e-7)
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(seeded(chunked, inputs, 7)[0], seeded(chunked, inputs, 8)[0])
    monkeypatch.setattr(token_chunks, "restore_rng", lambda devices, state: None)  # backward draws new masks
    grads = seeded(chunked, inputs, 7)[2]
    grads_ref = seeded(reference, inputs, 7)[2]
    assert not all(torch.allclose(grads[n], grads_ref[n], rtol=1e-5, atol=1e-7) for n in grads_ref)


def test_with_offloaded_checkpointing_bit_for_bit():
    """Offloading the checkpointed layers' inputs (5 layers, a budget of 0) changes no number of
    the chunked run, dropout included: the chunked calls run inside the layers' checkpoints. The other
    run recomputes and chunks (a budget its prediction fits, with a recompute peak over a third of it)."""
    original = tiny_model("llama", lora=True, lora_dropout=0.1, checkpointing=True, layers=5)
    fits = estimate_activations(layers=5, tokens=2 * 37, hidden=64, intermediate=96, element_size=4).total
    recomputed = sloth_fx.optimize(twin(original), memory_budget=fits)
    offloaded = sloth_fx.optimize(twin(original), memory_budget=CHUNKING)
    loss, embeds_grad, grads = seeded(offloaded, batch(s=37), 3)
    loss_r, embeds_grad_r, grads_r = seeded(recomputed, batch(s=37), 3)
    assert sloth_fx.report(offloaded).checkpointing.keys() == {"offload"}
    assert sloth_fx.report(recomputed).checkpointing.keys() == {"recompute"}
    assert "this forward ran 5 MLPs over chunks of tokens" in sloth_fx.explain(recomputed)
    assert torch.equal(loss, loss_r) and torch.equal(embeds_grad, embeds_grad_r)
    assert all(torch.equal(grads[name], grads_r[name]) for name in grads_r)


def test_rows_within_a_chunk_run_as_they_were(runs, monkeypatch):
    """18 tokens against chunks of 32, in a step that chunks: no chunk, and every number as
    without the pass."""
    monkeypatch.setattr(token_chunks, "CHUNK_TOKENS", 32)
    original = tiny_model("llama", lora=True, checkpointing=True)
    chunked = sloth_fx.optimize(twin(original), memory_budget=CHUNKING)
    unchunked = sloth_fx.optimize(twin(original), passes=without_chunking())
    loss, embeds_grad, grads = step(chunked, batch())
    loss_u, embeds_grad_u, grads_u = step(unchunked, batch())
    assert runs == no_runs()
    assert torch.equal(loss, loss_u) and torch.equal(embeds_grad, embeds_grad_u)
    assert all(torch.equal(grads[name], grads_u[name]) for name in grads_u)
    assert sloth_fx.report(chunked).count("chunked_mlp") == 2


def test_on_by_default_last_and_in_the_report():
    """On by default, after the passes whose fused ops it outlines; named first, the passes after
    it rewrite inside the outlined MLP all the same."""
    assert sloth_fx.available_passes()[-1] == "chunked_mlp"
    original = tiny_model("llama", lora=True, checkpointing=True)
    default = sloth_fx.optimize(twin(original), memory_budget=CHUNKING, verify=True)
    first = sloth_fx.optimize(twin(original), passes=["chunked_mlp", *without_chunking()], memory_budget=CHUNKING)
    assert torch.equal(step(default, batch(s=37))[0], step(first, batch(s=37))[0])
    for model in (default, first):
        report = sloth_fx.report(model)
        assert report.sites("chunked_mlp") == [f"base_model.model.model.layers.{i}.mlp" for i in (0, 1)]
        assert report.count("lora") == 14 and report.count("gated_mlp") == 2 and not report.refusals()
    assert "dropped by verify" not in sloth_fx.explain(default)
    assert ("chunked_mlp: rewrote mlp  (chunks of 16 tokens, each run again in backward, in steps whose memory budget "
            "calls for it; ") in sloth_fx.explain(default)
    assert "hidden 64; outlined lora_linear_group, gated_mlp, lora_linear)" in sloth_fx.explain(default)
    assert "hidden 64; outlined linear, mul, add, silu)" in sloth_fx.explain(first)


class TokenMixingMLP(LlamaMLP):
    """A look-alike whose output mixes tokens: a running sum over the sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).cumsum(1)


def test_token_mixing_mlp_is_refused_by_name():
    model = tiny_model("llama", lora=True)
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            module.__class__ = TokenMixingMLP
    report = assert_refused_unchanged(model, "chunked_mlp")
    reasons = {refusal.reason for refusal in report.refusals("chunked_mlp")}
    assert len(reasons) == 1 and reasons.pop().endswith("(cumsum) is not known to act on each token alone")
    assert "chunked_mlp: refused mlp: " in sloth_fx.explain(model)
