"""Recomputing less: layers kept whole, layers recomputed with their products' outputs saved, and
the budget that chooses how many of each.

A kept layer, a selectively recomputed one and one recomputed whole give the same loss and
gradients bit for bit (``lora_dropout`` included: the recompute replays the RNG, and a saved output
is the forward's own); a selective layer's recompute runs none of its LoRA groups' products; the
policy spends the budget on saved products first, then on kept layers; ``explain`` says what each
step did.
"""

import math
import re

import pytest
import torch
from test_routed_experts import moe_model
from tiny_models import batch, loss_and_grads, tiny_model, twin

import sloth_fx
from sloth_fx.kernels import lora_function
from sloth_fx.memory import saved_products
from sloth_fx.kernels import routed_experts
from sloth_fx.memory.budget import SAVE_SHARE, decide_checkpointing, estimate_activations
from sloth_fx.memory.layer_bytes import mlp_widths, product_bytes_per_token

GiB = 2**30
LAYERS = 4
# Llama-2-7B's LoRA outputs per token (q, k, v, o, down 4096 wide; gate, up 11008) in bf16, and the
# fp32 x·Aᵀ of seven rank-16 adapters
E1_PRODUCTS = (5 * 4096 + 2 * 11008) * 2 + 7 * 16 * 4


def e1(tokens: int = 16384):
    return estimate_activations(layers=32, tokens=tokens, hidden=4096, intermediate=11008, element_size=2,
                                product_bytes=E1_PRODUCTS)


def test_product_bytes_are_counted_from_the_lora_linears():
    model = tiny_model("llama", lora=True)
    config = model.config
    widths = 2 * config.hidden_size + 2 * config.num_key_value_heads * config.head_dim + 3 * config.intermediate_size
    widths += config.hidden_size - config.intermediate_size  # down is hidden wide, gate and up intermediate
    expected = widths * 4 + 7 * 4 * 4  # fp32 outputs; seven rank-4 adapters' fp32 x·Aᵀ
    assert product_bytes_per_token(model.get_decoder(), 4) == expected
    assert product_bytes_per_token(tiny_model("llama").get_decoder(), 4) == 0  # no LoRA: nothing to save


def test_policy_saves_products_first_then_keeps_whole_layers():
    step = e1()
    assert step.products == 16384 * E1_PRODUCTS
    # an H100's default budget (~58 GiB): most layers selective, the rest whole, none kept
    h100 = decide_checkpointing(step, 58 * GiB)
    room = int(SAVE_SHARE * 58 * GiB) - step.total
    assert (h100.mode, h100.keep_first, h100.save_products) == ("selective", 0, room // step.products)
    assert 24 <= h100.save_products < 32
    # 100 GiB: every layer's products fit, what is left keeps whole layers; 120 GiB (an H200) keeps all
    roomy = decide_checkpointing(step, 100 * GiB)
    assert roomy.mode == "selective" and roomy.keep_first + roomy.save_products == 32 and 0 < roomy.keep_first < 32
    assert decide_checkpointing(step, 120 * GiB).keep_first == 32
    # no room for one layer's products: recompute whole, as before
    tight = int((step.total + step.products - 1) / SAVE_SHARE)
    assert decide_checkpointing(step, tight).mode == "recompute"
    assert decide_checkpointing(step, tight + 2).save_products == 1
    assert decide_checkpointing(e1(2048), 80 * GiB).keep  # everything fits in half the budget: kept
    assert decide_checkpointing(step, None).mode == "recompute"  # no budget (CPU): as asked
    # a step that chunks its MLPs saves nothing beside (the chunks would save what they free)
    assert decide_checkpointing(e1(65536), 20 * GiB).save_products == 0
    text = h100.text
    assert text.startswith(f"0 layers kept whole (about 2.72 GiB each), {h100.save_products} recompute keeping their "
                           "products' outputs (1.30 GiB each)")
    assert "within 80% of the budget of 58.00 GiB" in text


def budget_for(model, selective: int, kept: int = 0, inputs=None) -> int:
    """A memory budget under which ``model``'s step on ``inputs`` (default ``batch()``) keeps
    ``kept`` layers and recomputes ``selective`` with their products saved (the rest whole)."""
    config, inputs = model.config, inputs or batch()
    size = model.get_input_embeddings().weight.element_size()
    dense, routed = mlp_widths(config, config.hidden_size)
    step = estimate_activations(LAYERS, inputs["input_ids"].numel(), config.hidden_size, dense, size,
                                product_bytes_per_token(model.get_decoder(), size), routed)
    spend = (LAYERS if kept else selective) * step.products
    spend += kept * (step.kept_layer - step.layer_input - step.products)
    # with nothing to spend, the prediction itself: it fits, and leaves no room
    budget = math.ceil((step.total + spend) / SAVE_SHARE) + 1 if spend else step.total
    decision = decide_checkpointing(step, budget)
    assert (decision.keep_first, decision.save_products) == (kept, selective - kept if kept else selective)
    return budget


@pytest.fixture
def products_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the fused LoRA groups ran their products."""
    runs: list[int] = []
    run = lora_function._products

    def counted(*args, **kwargs):
        runs.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(lora_function, "_products", counted)
    return runs


def seeded(model, seed: int = 5, inputs=None):
    torch.manual_seed(seed)
    return loss_and_grads(model, inputs or batch())


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_kept_selective_and_whole_layers_give_the_same_loss_and_gradients(products_runs, lora_dropout):
    original = tiny_model("llama", lora=True, checkpointing=True, layers=LAYERS, lora_dropout=lora_dropout)
    whole = sloth_fx.optimize(twin(original))  # CPU without a budget: every layer recomputes whole
    plain = seeded(whole)
    groups = len(products_runs) // (2 * LAYERS)  # each group's products ran in the forward and the recompute
    assert groups >= 3 and len(products_runs) == 2 * LAYERS * groups
    cases = {"every layer selective": (LAYERS, 0), "two selective, two whole": (2, 0), "one kept, three selective": (LAYERS, 1)}
    for name, (selective, kept) in cases.items():
        optimized = sloth_fx.optimize(twin(original), memory_budget=budget_for(original, selective, kept))
        products_runs.clear()
        loss, grads = seeded(optimized)
        assert torch.equal(loss, plain[0]), name
        assert all(torch.equal(grads[k], plain[1][k]) for k in plain[1]) and grads.keys() == plain[1].keys(), name
        recomputed_whole = LAYERS - selective if not kept else 0
        assert len(products_runs) == (LAYERS + recomputed_whole) * groups, name  # no product ran in a selective recompute
        text = sloth_fx.explain(optimized)
        saving = selective - kept if kept else selective
        assert (f"this forward ran {kept} checkpointed layers without a recompute, checkpointed {saving} saving "
                in text), (name, text)
        assert f"of their products' outputs and {LAYERS - kept - saving} whole" in text, name
    if lora_dropout:  # the masks are really random: another seed gives another loss
        assert not torch.equal(seeded(whole, seed=6)[0], plain[0])


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("stacks", ["dense", "nf4"])
def test_moe_selective_layers_take_the_experts_products_back_and_give_the_same_numbers(monkeypatch, stacks):
    """The routed-experts op keeps its grouped products in a selective layer's forward: its
    recompute runs none of them, and loss and gradients (router, experts' and attention's adapters)
    are those of the whole recompute bit for bit, with dense stacks and with 4-bit ones."""
    runs: list[int] = []
    run = routed_experts._forward
    monkeypatch.setattr(routed_experts, "_forward", lambda *a: runs.append(1) or run(*a))
    original = moe_model("mixtral", lora=True, checkpointing=True, layers=LAYERS)
    if stacks == "nf4":
        pytest.importorskip("bitsandbytes")
        sloth_fx.quantize_experts(original)
    whole = sloth_fx.optimize(twin(original))  # CPU without a budget: every layer recomputes whole
    seeded(whole)  # the first call also checks the op against each module's own forward
    runs.clear()
    plain = seeded(whole)
    assert len(runs) == 2 * LAYERS  # the forward and the recompute of each layer
    for selective, kept in ((LAYERS, 0), (2, 0), (LAYERS, 1)):
        optimized = sloth_fx.optimize(twin(original), memory_budget=budget_for(original, selective, kept))
        seeded(optimized)  # the first call's check of the op against the module's forward saves nothing
        first = re.search(r"saving (\S+ \S+) of their products' outputs", str(sloth_fx.explain(optimized)))
        runs.clear()
        loss, grads = seeded(optimized)
        assert first is not None and first.group(0) in str(sloth_fx.explain(optimized)), (selective, kept)
        assert torch.equal(loss, plain[0]) and grads.keys() == plain[1].keys(), (selective, kept)
        assert all(torch.equal(grads[k], plain[1][k]) for k in plain[1]), (selective, kept)
        assert len(runs) == LAYERS + (0 if kept else LAYERS - selective), (selective, kept)
        assert "fused op" in str(sloth_fx.explain(optimized))


def test_an_output_written_in_place_after_it_was_saved_is_computed_again():
    saved = saved_products.SavedProducts()
    y, xa = torch.randn(3, 4), torch.randn(3, 2)
    doubled = y * 2
    with saved_products.products_saved(saved, replay=False):
        saved_products.remember(y, y, (y, xa))
        saved_products.remember(y, y, (doubled, xa))
    assert saved.count == 2 and saved.nbytes == 2 * (12 + 6) * 4
    y.add_(1)
    with saved_products.products_saved(saved, replay=True):
        assert saved_products.recall(y, y) is None  # y moved on: the product runs again
        second = saved_products.recall(y, y)
        assert second is not None and second[0] is not doubled and torch.equal(second[0], doubled)
        assert saved_products.recall(y, y) is None  # nothing more saved
    assert saved_products.recall(y, y) is None  # outside a recompute: never


@pytest.mark.gpu
def test_gpu_selective_layers_give_the_whole_recompute_bit_for_bit_in_bf16(products_runs):
    """On the GPU's kernels (Triton's rank-r products: over 4096 tokens a step) and in bf16."""
    original = tiny_model("llama", lora=True, checkpointing=True, layers=LAYERS, lora_dropout=0.1,
                          dtype=torch.bfloat16).cuda()
    ids = torch.randint(0, 101, (8, 600), generator=torch.Generator().manual_seed(0)).cuda()
    inputs = {"input_ids": ids, "labels": ids}
    whole = sloth_fx.optimize(twin(original), memory_budget=budget_for(original, 0, inputs=inputs))
    plain = seeded(whole, inputs=inputs)
    runs_whole = len(products_runs)
    selective = sloth_fx.optimize(twin(original), memory_budget=budget_for(original, LAYERS, inputs=inputs))
    products_runs.clear()
    loss, grads = seeded(selective, inputs=inputs)
    assert torch.isfinite(loss) and torch.equal(loss, plain[0])
    assert grads.keys() == plain[1].keys() and all(torch.equal(grads[k], plain[1][k]) for k in grads)
    assert runs_whole == 2 * len(products_runs) > 0  # a selective recompute runs none of the products
