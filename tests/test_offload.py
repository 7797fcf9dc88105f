"""Offloaded activation checkpointing and the memory budget that turns it on.

Offload on and off give the same loss and gradients bit for bit (the copies are exact and the
recompute replays the RNG); what moves is the checkpointed layers' own inputs, each leaving when
the next layer starts and coming back one layer ahead of its recompute, with a bounded number of
copies alive; the budget policy offloads above the budget and not below; ``explain`` states each
step's decision and its predicted activation memory.
"""

import contextlib
import math
import weakref

import pytest
import torch
from tiny_models import batch, loss_and_grads, tiny_model, twin
from torch import nn

import sloth_fx
from sloth_fx.memory import offload
from sloth_fx.memory.checkpoint import checkpoint_body
from sloth_fx.memory.budget import (CHUNK_SHARE, SAVE_SHARE, decide_checkpointing, device_budget, estimate_activations,
                                    plan_checkpointing)
from sloth_fx.memory.layer_bytes import mlp_widths, product_bytes_per_token

GiB = 2**30


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[offload.OffloadStep]:
    """Every OffloadStep made from now on, in order."""
    made: list[offload.OffloadStep] = []

    class RecordedStep(offload.OffloadStep):
        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    monkeypatch.setattr(offload, "OffloadStep", RecordedStep)
    return made


def seeded_step(model, inputs, seed=7):
    torch.manual_seed(seed)
    return loss_and_grads(model, inputs)


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


# --- the budget -----------------------------------------------------------------------------------

def llama2_7b(tokens):
    return estimate_activations(layers=32, tokens=tokens, hidden=4096, intermediate=11008, element_size=2)


def test_estimate_counts_every_layer_input_and_one_recompute():
    long = llama2_7b(65536)
    assert long.layer_input == 65536 * 4096 * 2 and long.saved_inputs == 16 * GiB
    assert long.total == long.saved_inputs + long.recompute_peak
    assert long.offloaded == 3 * long.layer_input + long.recompute_peak < long.total
    assert 8 * GiB < long.recompute_peak < 16 * GiB  # the probe's 11.3 GiB beside the 16 GiB of inputs
    assert llama2_7b(2048).total * 32 == long.total


def test_policy_offloads_above_the_budget_and_not_below():
    long, short = llama2_7b(65536), llama2_7b(2048)
    deep = estimate_activations(layers=96, tokens=16384, hidden=4096, intermediate=11008, element_size=2)
    assert deep.recompute_peak <= deep.total / 3  # its threshold is the unchunked prediction's
    assert not decide_checkpointing(deep, deep.total).offload and decide_checkpointing(deep, deep.total - 1).offload
    assert not decide_checkpointing(deep, deep.total - 1).chunk
    assert not decide_checkpointing(long, 80 * GiB).offload
    assert decide_checkpointing(long, 20 * GiB).offload
    assert not decide_checkpointing(short, 20 * GiB).offload  # a short batch never pays for the copies
    # a peak over a third of the budget: offloading unchunked first, while it takes at most SAVE_SHARE of it
    unchunked = math.ceil(long.offloaded / SAVE_SHARE)
    assert decide_checkpointing(long, unchunked).offload and not decide_checkpointing(long, unchunked).chunk
    assert decide_checkpointing(long, unchunked - 2).offload and decide_checkpointing(long, unchunked - 2).chunk
    alone = decide_checkpointing(long, 20 * GiB).text
    assert alone == ("predicted activation memory 26.70 GiB (32 checkpointed layer inputs 16.00 GiB, recompute peak "
                     "10.70 GiB): one layer's recompute peak is over a third of the budget of 20.00 GiB; layer inputs "
                     "offloaded to host memory instead of chunking the MLPs, about 12.20 GiB kept on the device, within "
                     "80% of the budget")
    assert not decide_checkpointing(long, None).offload  # no budget (CPU): nothing to save
    on = decide_checkpointing(long, 12 * GiB).text
    assert "predicted activation memory 22.59 GiB (32 checkpointed layer inputs 16.00 GiB, recompute peak 6.59 GiB)" in on
    assert "over the budget of 12.00 GiB" in on and "still over" not in on
    assert "still over the budget" in decide_checkpointing(long, 5 * GiB).text
    assert "fits in the budget of 80.00 GiB" in decide_checkpointing(long, 80 * GiB).text
    few = estimate_activations(layers=3, tokens=65536, hidden=4096, intermediate=11008, element_size=2)
    assert few.offloaded == few.total and not decide_checkpointing(few, 0).offload  # nothing to gain: 3 layers are kept
    assert "but offloading 3 layers would keep as much on the device" in decide_checkpointing(few, 0).text


def test_policy_keeps_activations_within_half_the_budget():
    short, e1 = llama2_7b(2048), llama2_7b(16384)
    assert short.kept == 32 * 2048 * (11 * 4096 + 4 * 11008) * 2  # ~10.9 GiB: R1's longest steps are ~1.6x this
    decision = decide_checkpointing(short, 80 * GiB)
    assert decision.keep and not decision.offload
    assert decision.text == "activations kept, no recompute: 10.88 GiB for 32 layers, within half the budget of 80.00 GiB"
    assert decide_checkpointing(short, 2 * short.kept).keep and not decide_checkpointing(short, 2 * short.kept - 2).keep
    assert decide_checkpointing(e1, 120 * GiB).mode == "recompute"  # E1 on an H200 recomputes as asked
    assert decide_checkpointing(short, 20 * GiB).mode == "recompute"
    assert decide_checkpointing(short, None).mode == "recompute"  # no budget (CPU): checkpointing as asked


def test_policy_chunks_the_mlps_where_one_layers_recompute_peak_is_over_a_third_of_the_budget():
    """The 16 GiB-capped H200 (about 10.5 GiB of budget left by the nf4 model): 16,384 tokens (a 2.68
    GiB peak) trained unchunked, 24,576 (4.02 GiB) recomputing unchunked did not. Offloading alone
    goes first where it fits (E1 capped at 20.36 GiB on an H200: chunked it ran out of memory,
    offloaded unchunked it trained); E1 uncapped on an H200 never chunks."""
    budget = int(10.5 * GiB)
    assert not decide_checkpointing(llama2_7b(16384), budget).chunk
    assert decide_checkpointing(llama2_7b(24576), budget).mode == "offload"  # offloading alone fits
    assert not decide_checkpointing(llama2_7b(24576), budget).chunk
    assert decide_checkpointing(llama2_7b(49152), budget).chunk
    e1 = llama2_7b(16384)
    assert not decide_checkpointing(e1, 110 * GiB).chunk and not decide_checkpointing(e1, 40 * GiB).chunk
    peak = e1.recompute_peak
    assert not decide_checkpointing(e1, 3 * peak).chunk and decide_checkpointing(e1, 3 * peak - 3).offload
    assert not decide_checkpointing(e1, 3 * peak - 3).chunk  # E1 capped at Unsloth's peak (H200): offloaded, unchunked
    assert decide_checkpointing(e1, math.floor(e1.offloaded / SAVE_SHARE) - 1).chunk
    long = decide_checkpointing(llama2_7b(65536), 12 * GiB)
    assert long.offload and long.chunk
    assert long.text.endswith("; MLPs run over chunks of 8192 tokens (one layer's recompute peak would be 10.70 GiB, "
                              "over a third of the budget)")
    assert not decide_checkpointing(llama2_7b(2048), 80 * GiB).chunk  # kept: nothing is recomputed
    assert not decide_checkpointing(llama2_7b(65536), None).chunk  # no budget (CPU): as asked


def test_budget_on_cpu_is_the_given_one_or_none():
    assert device_budget(torch.device("cpu"), 12345) == 12345
    assert device_budget(torch.device("cpu"), None) is None


def test_budget_on_cuda_is_what_the_allocator_may_still_hand_out_within_the_process_cap(monkeypatch):
    """Made-up figures: 100 GiB free of 140, 30 GiB reserved of which 10 unused."""
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (100 * GiB, 140 * GiB))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 30 * GiB)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 20 * GiB)
    for fraction, expected in ((1.0, 110), (0.5, 50), (0.25, 15), (0.1, 10)):  # min(free, cap - reserved) + unused
        monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None, f=fraction: f)
        assert device_budget(torch.device("cuda", 0), None) == int(expected * GiB * 0.9)


def test_plan_reads_checkpointing_tokens_and_sizes_from_the_model():
    model = tiny_model("llama", layers=5)
    inputs = batch(b=2, s=9)
    assert plan_checkpointing(model, (), inputs, 0).text.startswith("no activation checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want = estimate_activations(layers=5, tokens=18, hidden=64, intermediate=96, element_size=4)
    assert plan_checkpointing(model, (), inputs, want.total - 1).offload
    assert not plan_checkpointing(model, (), inputs, want.total).offload
    model.model.layers[1].gradient_checkpointing = False  # every_n_layers leaves some layers whole
    four = estimate_activations(layers=4, tokens=18, hidden=64, intermediate=96, element_size=4)
    assert not plan_checkpointing(model, (), inputs, four.total).offload and plan_checkpointing(model, (), inputs, four.total - 1).offload
    assert not plan_checkpointing(model, (), inputs, None).offload


def test_moe_widths_count_top_k_experts_and_the_shared_expert_and_never_chunk_the_routed_part():
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    assert mlp_widths(LlamaConfig(hidden_size=64, intermediate_size=96), 64) == (96, 0)
    assert mlp_widths(MixtralConfig(hidden_size=64, intermediate_size=96, num_experts_per_tok=2), 64) == (0, 192)
    assert mlp_widths(Qwen3MoeConfig(hidden_size=64, intermediate_size=300, moe_intermediate_size=40,
                                     num_experts_per_tok=8), 64) == (0, 320)
    assert mlp_widths(Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                     num_experts_per_tok=4), 64) == (56, 160)
    # Mixtral-8x7B at 16k tokens: each token saves two experts' [2I] (not one dense MLP's), and the
    # experts run outside the capture, where nothing chunks them: the chunked peak is the peak
    mixtral = estimate_activations(layers=32, tokens=16384, hidden=4096, intermediate=0, element_size=2,
                                   routed=2 * 14336)
    dense = estimate_activations(layers=32, tokens=16384, hidden=4096, intermediate=14336, element_size=2)
    assert mixtral.kept > dense.kept and mixtral.recompute_peak > dense.recompute_peak
    assert mixtral.chunked_peak == mixtral.recompute_peak > dense.chunked_peak
    assert not decide_checkpointing(mixtral, int(mixtral.recompute_peak / CHUNK_SHARE) - 1).chunk


def test_routed_experts_count_what_their_op_keeps_for_a_selective_recompute():
    """Per token: attention's LoRA outputs and x·Aᵀ, then the routed-experts op's k slots of
    [2I] gate/up and an int64 place, the H-wide output, and with LoRA on the experts (PEFT's
    ParamWrapper, not a LoRA linear) each slot's fp32 x·Aᵀ of both stacks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    only_attention = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=attention))
    with_experts = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(
        r=4, target_modules=attention, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    counted = [product_bytes_per_token(m.base_model.model.model, 2) for m in (only_attention, with_experts)]
    linears = (32 + 16 + 16 + 32) * 2 + 4 * 4 * 4
    experts = (2 * 2 * 48 + 32) * 2 + 8 * 2
    assert counted == [linears + experts, linears + experts + 4 * 2 * (4 + 4)]


def test_memory_budget_must_be_bytes():
    for bad in (-1, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="memory_budget"):
            sloth_fx.optimize(tiny_model("llama"), memory_budget=bad)


# --- through optimize -----------------------------------------------------------------------------

@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_offload_on_and_off_give_the_same_loss_and_gradients(steps, lora_dropout):
    layers = 4
    original = tiny_model("llama", lora=True, checkpointing=True, layers=layers, lora_dropout=lora_dropout)
    off = sloth_fx.optimize(twin(original))  # CPU without a budget: never offloads
    on = sloth_fx.optimize(twin(original), memory_budget=0)
    plain = seeded_step(off, batch())
    assert steps == []
    assert_bitwise_same(seeded_step(on, batch()), plain)
    (step,) = steps
    assert step.log == [("offload", k) for k in range(layers - 1)] + [("prefetch", k) for k in reversed(range(layers - 1))]
    if lora_dropout:  # the masks are really random: another seed gives another loss
        assert not torch.equal(seeded_step(on, batch(), seed=8)[0], plain[0])


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_kept_activations_give_the_recomputed_loss_and_gradients_without_a_recompute(monkeypatch, lora_dropout):
    original = tiny_model("llama", lora=True, checkpointing=True, layers=3, lora_dropout=lora_dropout)
    recomputed = sloth_fx.optimize(twin(original))  # CPU without a budget: checkpointing as asked
    kept = sloth_fx.optimize(twin(original), memory_budget=2**40)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr("sloth_fx.memory.checkpoint.checkpoint", counted)
    plain = seeded_step(recomputed, batch())
    checkpoints = 3  # sloth_fx's own checkpoint, one per layer, whatever transformers does
    assert len(calls) == checkpoints
    assert_bitwise_same(seeded_step(kept, batch()), plain)
    assert len(calls) == checkpoints  # no checkpoint in the kept step
    text = sloth_fx.explain(kept)
    assert "activation checkpointing, keep (latest): activations kept, no recompute" in text
    assert "; this forward ran 3 checkpointed layers without a recompute" in text
    assert "activation checkpointing, recompute" not in text
    if lora_dropout:  # the masks are really random: another seed gives another loss
        assert not torch.equal(seeded_step(kept, batch(), seed=8)[0], plain[0])


@pytest.mark.usefixtures("reference_ops")
def test_training_with_offload_matches_hf_step_for_step(steps):
    hf = tiny_model("llama", lora=True, checkpointing=True, layers=4, lora_dropout=0.1)
    optimized = sloth_fx.optimize(twin(hf), passes=[], memory_budget=0)
    models = (hf, optimized)
    before = [p.detach().clone() for p in hf.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    for step in range(4):
        inputs = batch(b=2, s=7 + step, seed=step)
        losses = []
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(100 + step)
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert torch.equal(*losses), (step, losses)
    assert len(steps) == 4 and all(s.log.count(("prefetch", 0)) == 1 for s in steps)
    for (name, p), q in zip(hf.named_parameters(), optimized.parameters()):
        assert torch.equal(p, q), name
    assert not any(torch.equal(p, q) for p, q in zip(before, [p for p in hf.parameters() if p.requires_grad]))


@pytest.mark.usefixtures("reference_ops")
def test_each_step_decides_and_explain_says_what_and_why(steps):
    short, long = batch(b=1, s=4), batch(b=4, s=40)
    # the short step fits, with no room left to save products (SAVE_SHARE of the budget holds only it)
    between = estimate_activations(layers=4, tokens=5, hidden=64, intermediate=96, element_size=4).total
    model = sloth_fx.optimize(tiny_model("llama", lora=True, checkpointing=True, layers=4), memory_budget=between)
    loss_and_grads(model, short)
    assert steps == []
    text = sloth_fx.explain(model)
    assert "activation checkpointing, recompute (latest): predicted activation memory 21.25 KiB (4 checkpointed layer inputs 4.00 KiB, " \
           "recompute peak 17.25 KiB) fits in the budget of 26.56 KiB" in text
    assert "activation checkpointing, offload" not in text
    loss_and_grads(model, long)
    assert len(steps) == 1 and steps[0].log == [("offload", 0), ("offload", 1), ("offload", 2),
                                                ("prefetch", 2), ("prefetch", 1), ("prefetch", 0)]
    text = sloth_fx.explain(model)
    assert "activation checkpointing, offload (latest): predicted activation memory 850.00 KiB (4 checkpointed layer inputs " \
           "160.00 KiB, recompute peak 690.00 KiB) is over the budget of 26.56 KiB: layer inputs offloaded to host " \
           "memory, about 810.00 KiB kept on the device, still over the budget" in text
    assert "activation checkpointing, recompute (latest)" in text


@pytest.mark.usefixtures("reference_ops")
def test_explain_says_what_a_forward_moved_and_when_a_decision_to_offload_moved_nothing(monkeypatch):
    inputs = batch(b=4, s=40)
    model = sloth_fx.optimize(tiny_model("llama", lora=True, checkpointing=True, layers=4), memory_budget=0)
    loss_and_grads(model, inputs)
    moved = 3 * 4 * 40 * 64 * 4  # every layer's fp32 hidden input but the last one's
    assert f"; this forward moved 3 layers' inputs ({moved / 2**10:.2f} KiB) to host memory" in sloth_fx.explain(model)
    # a layer checkpointed around sloth_fx's checkpoint (as if a graph break left HF's in charge)
    monkeypatch.setattr("sloth_fx.memory.checkpoint.offloaded_inputs", lambda args: contextlib.nullcontext())
    loss_and_grads(model, inputs)
    text = sloth_fx.explain(model)
    assert "activation checkpointing, offload (latest)" in text
    assert "this forward moved nothing: no checkpointed layer ran through sloth_fx's checkpoint" in text


@pytest.mark.usefixtures("reference_ops")
def test_explain_says_why_not_without_checkpointing_or_budget():
    model = sloth_fx.optimize(tiny_model("llama", lora=True))
    loss_and_grads(model, batch())
    assert "activation checkpointing, none (latest): no activation checkpointing" in sloth_fx.explain(model)
    model = sloth_fx.optimize(tiny_model("llama", lora=True, checkpointing=True))
    loss_and_grads(model, batch())
    assert "no budget: no device memory to save on CPU (memory_budget sets one)" in sloth_fx.explain(model)


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
        # the layer's hidden input, found by shape: on CUDA the checkpoint saves an empty tensor first
        hidden = [s for s in layer.inputs if s.host is not None and s.host.shape == x.shape]
        assert len(hidden) == 1
        hidden = hidden[0]
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


@pytest.mark.gpu
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_gpu_tiny_llama_offload_is_exact(lora_dropout):
    original = tiny_model("llama", lora=True, checkpointing=True, layers=4, lora_dropout=lora_dropout).cuda()
    off, on = sloth_fx.optimize(twin(original)), sloth_fx.optimize(twin(original), memory_budget=0)
    inputs = {k: v.cuda() for k, v in batch().items()}
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # a deterministic attention backward
        plain = seeded_step(off, inputs)
        assert_bitwise_same(seeded_step(off, inputs), plain)  # control: the step itself is deterministic
        assert_bitwise_same(seeded_step(on, inputs), plain)
    assert "activation checkpointing, offload (latest)" in sloth_fx.explain(on)


@pytest.mark.gpu
def test_gpu_default_budget_is_what_the_device_can_hand_out():
    free, total = torch.cuda.mem_get_info()
    budget = device_budget(torch.device("cuda"), None)
    assert 0 < budget <= total and budget >= 0.8 * free
    model = tiny_model("llama", checkpointing=True).cuda()
    decision = plan_checkpointing(model, (), {k: v.cuda() for k, v in batch().items()}, None)
    assert decision.keep and "within half the budget" in decision.text


@pytest.mark.gpu
def test_gpu_budget_stays_inside_a_per_process_memory_cap():
    before = torch.cuda.get_per_process_memory_fraction()
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.empty_cache()  # what the allocator holds unused it may hand out whatever the cap: none here
    try:
        torch.cuda.set_per_process_memory_fraction(0.05)
        assert 0 <= device_budget(torch.device("cuda"), None) <= 0.05 * total
    finally:
        torch.cuda.set_per_process_memory_fraction(before)


@pytest.mark.gpu
def test_gpu_offload_lowers_the_peak_of_a_checkpointed_llama_from_the_first_step():
    """E1 with offload on peaked as high as without it on the H200 (19.75 GiB both): here a model
    whose layer inputs dominate its step's memory must peak lower with offload, in the first
    (capturing) step as in the next."""
    layers, rows, seq = 24, 8, 2048
    original = tiny_model("llama", lora=True, checkpointing=True, layers=layers, dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 101, (rows, seq), generator=torch.Generator().manual_seed(0)).cuda()
    inputs = {"input_ids": ids, "labels": ids}
    layer_input = rows * seq * original.config.hidden_size * 2
    config = original.config
    estimate = estimate_activations(layers, rows * seq, config.hidden_size, config.intermediate_size, 2)
    # the smallest budget that recomputes unchunked: one layer's peak within a third of it (else
    # the step offloads first), too little beside the prediction to save any layer's products
    recompute = max(estimate.total, math.ceil(estimate.recompute_peak / CHUNK_SHARE))
    peaks = {}
    for budget in (recompute, 0):  # checkpointing as asked against offloaded
        model = sloth_fx.optimize(twin(original), memory_budget=budget)
        peaks[budget] = []
        for _ in range(2):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            seeded_step(model, inputs)
            torch.cuda.synchronize()
            peaks[budget].append(torch.cuda.max_memory_allocated() - base)
        mode = "offload" if budget == 0 else "recompute"
        assert f"activation checkpointing, {mode} (latest)" in sloth_fx.explain(model)
        del model
    for step, (plain, moved) in enumerate(zip(peaks[recompute], peaks[0])):
        assert moved <= plain - (layers - 8) * layer_input, (step, plain, moved)  # ~3 layers kept, copies in flight
