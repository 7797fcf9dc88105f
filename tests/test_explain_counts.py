"""``explain`` counts what runs: the fused ops' calls in a forward equal the report's sites, over
captures that differ (the first layer, whose input needs no grad under LoRA; batch and sequence
sizes of 1; a padded batch packed), and a module that Dynamo runs eagerly is named with a reason."""

import pytest
import torch
from tiny_models import batch, loss_and_grads, tiny_model

import sloth_fx
import sloth_fx.passes.lora as lora_pass
import sloth_fx.passes.rmsnorm as rmsnorm_pass
import sloth_fx.passes.gated_mlp as gated_mlp_pass

pytestmark = pytest.mark.usefixtures("reference_ops")


@pytest.fixture
def calls(monkeypatch):
    """Count each fused op's sites per call (a LoRA group call serves one site per weight)."""
    counts = {"rmsnorm": 0, "gated_mlp": 0, "lora": 0}

    def counting(module, attr, name, sites):
        fn = getattr(module, attr)

        def wrapper(*args, **kwargs):
            counts[name] += sites(args)
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapper)

    counting(rmsnorm_pass, "rmsnorm", "rmsnorm", lambda args: 1)
    counting(gated_mlp_pass, "gated_mlp", "gated_mlp", lambda args: 1)
    counting(lora_pass, "lora_linear", "lora", lambda args: 1)
    counting(lora_pass, "lora_linear_group", "lora", lambda args: len(args[1]))
    return counts


@pytest.mark.full
def test_explain_counts_equal_the_fused_calls(calls):
    model = sloth_fx.optimize(tiny_model("llama", lora=True, layers=3))
    padded = batch(b=3, s=8)
    padded["attention_mask"] = torch.ones_like(padded["input_ids"])
    padded["attention_mask"][2, 5:] = 0
    padded["labels"][2, 5:] = -100
    for inputs in (batch(), batch(b=1, s=6), batch(b=2, s=1), padded):
        for name in calls:
            calls[name] = 0
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss  # counted in the forward only (no recompute: no checkpointing)
        report = sloth_fx.report(model)
        assert {name: report.count(name) for name in calls} == calls, (tuple(inputs["input_ids"].shape), calls)
        loss.backward()
    assert calls == {"rmsnorm": 2 * 3 + 1, "gated_mlp": 3, "lora": 7 * 3}
    text = sloth_fx.explain(model)
    assert "rewrite sites running in the model: cross_entropy 1, gated_mlp 3, lora 21, rmsnorm 7, rope 6" in text
    assert "padding-free, applied (latest): padding-free: 3 rows (right padding), 21 of 24 tokens" in text


def test_a_module_run_eagerly_is_named_with_its_reason():
    model = sloth_fx.optimize(tiny_model("llama", layers=2), passes=["rmsnorm"])
    with torch._dynamo.set_stance("force_eager"):
        loss_and_grads(model, batch())
    report = sloth_fx.report(model)
    assert report.count("rmsnorm") == 0
    text = sloth_fx.explain(model)
    assert "model.layers.1 runs unrewritten: TorchDynamo did not capture its forward" in text
    loss_and_grads(model, batch())
    assert report.count("rmsnorm") == 5 and "runs unrewritten" not in sloth_fx.explain(model)


def test_dora_counts_what_runs(calls):
    """DoRA's linears are not LoRA's pattern (the magnitude vector rescales the sum): they are
    refused, and the norms, ropes and MLPs around them are counted as they run."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model("llama", layers=2)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    model = sloth_fx.optimize(model)
    model(**batch()).loss.backward()
    report = sloth_fx.report(model)
    assert {name: report.count(name) for name in calls} == calls
    assert calls["rmsnorm"] == 5 and calls["gated_mlp"] == 2
    assert report.count("rope") == 4


def test_explain_after_merge_and_unload():
    """The merged model still runs through sloth_fx, and explain counts its runs: no LoRA left."""
    model = sloth_fx.optimize(tiny_model("llama", lora=True))
    loss_and_grads(model, batch())
    assert sloth_fx.report(model).count("lora") == 14
    merged = model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    loss_and_grads(merged, batch())
    text = sloth_fx.explain(merged)
    assert "rewrite sites running in the model: chunked_mlp 2, cross_entropy 1, gated_mlp 2, rmsnorm 5, rope 4" in text
