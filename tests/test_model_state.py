"""sloth_fx's state lives on the model: copies, pickles, many models in one process, deep models.

The fused ops run their plain-PyTorch references here (TRITON_INTERPRET off): these tests are
about capture, not kernels, and the kernels' own tests run them in the interpreter.
"""

import copy
import inspect
import io

import pytest
import torch
from tiny_models import assert_same_training_step, batch, loss_and_grads, tiny_model, twin

import sloth_fx


pytestmark = pytest.mark.usefixtures("reference_ops")


def zero_lora_b(model):
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
    return model


def test_deepcopy_trains_its_own_weights():
    original = tiny_model("llama", lora=True, checkpointing=True)
    optimized = sloth_fx.optimize(twin(original))
    loss_and_grads(optimized, batch())
    copied = zero_lora_b(copy.deepcopy(optimized))
    optimized.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in optimized.named_parameters()}
    assert_same_training_step(zero_lora_b(twin(original)), copied, batch())
    # the copy's gradients land on its own parameters: the original has none
    assert all(p.grad is None for p in optimized.parameters())
    assert all(torch.equal(p, before[n]) for n, p in optimized.named_parameters())
    assert sloth_fx.report(copied).count("rmsnorm") == 5 and sloth_fx.report(optimized).count("rmsnorm") == 5
    assert sloth_fx.report(copied) is not sloth_fx.report(optimized)


def test_pickle_round_trip_trains_exactly():
    original = tiny_model("llama", lora=True)
    optimized = sloth_fx.optimize(twin(original))
    loss_and_grads(optimized, batch())
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_same_training_step(original, loaded, batch())
    assert sloth_fx.report(loaded).count("lora") == 14


def test_forward_signature_is_the_original():
    original = tiny_model("llama", lora=True)
    optimized = sloth_fx.optimize(twin(original))
    base, ref = optimized.get_base_model(), original.get_base_model()
    assert inspect.signature(base.forward) == inspect.signature(ref.forward)
    assert inspect.signature(base.model.layers[0].forward) == inspect.signature(ref.model.layers[0].forward)


def test_uninstall_restores_what_install_replaced():
    model = tiny_model("llama")
    layer = model.model.layers[1]
    hooked = layer.forward  # someone else's instance-level forward (as accelerate installs them)
    layer.forward = hooked
    sloth_fx.optimize(model)
    sloth_fx.optimize(model, passes=["rmsnorm"])  # replaces the first set-up
    from sloth_fx.capture.install import uninstall

    uninstall(model._sloth_fx)
    assert layer.__dict__["forward"] is hooked
    assert "forward" not in model.model.layers[0].__dict__ and "forward" not in model.__dict__
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.full
def test_sweep_of_models_in_one_process_each_rewritten_and_exact():
    """A hyperparameter sweep: every model its own eps and lora_alpha, every rewrite applied."""
    limit = torch._dynamo.config.recompile_limit
    for i in range(40):
        original = tiny_model("llama", lora=True, layers=1, seed=i, checkpointing=i % 2 == 1)
        eps = 10.0 ** -(3 + i % 5)
        for module in original.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = eps
            if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                module.scaling = {k: (i + 1) / 4 for k in module.scaling}
        optimized = sloth_fx.optimize(twin(original))
        assert_same_training_step(original, optimized, batch())
        report = sloth_fx.report(optimized)
        counts = {name: report.count(name) for name in ("lora", "rmsnorm", "rope", "gated_mlp", "cross_entropy")}
        assert counts == {"lora": 7, "rmsnorm": 3, "rope": 2, "gated_mlp": 1, "cross_entropy": 1}, (i, counts)
    assert torch._dynamo.config.recompile_limit == limit


def test_deep_model_without_checkpointing_rewrites_every_layer():
    model = sloth_fx.optimize(tiny_model("llama", layers=80), passes=["rmsnorm"])
    loss_and_grads(model, batch())
    report = sloth_fx.report(model)
    assert report.count("rmsnorm") == 2 * 80 + 1
    assert len(report.regions["LlamaDecoderLayer"].captures) <= 2


def test_per_layer_captures_get_room_of_their_own():
    """With the cache asked for, each layer is captured apart (Dynamo guards on its cache entry):
    more layers than Dynamo's global limit all run rewritten, and the global limit is untouched."""
    with torch._dynamo.config.patch(recompile_limit=4):
        model = sloth_fx.optimize(tiny_model("llama", layers=6), passes=["rmsnorm"])
        loss_and_grads(model, {**batch(), "use_cache": True})
        assert torch._dynamo.config.recompile_limit == 4
    report = sloth_fx.report(model)
    assert report.count("rmsnorm") == 2 * 6 + 1
    assert not any(r.eager for r in report.regions.values())
