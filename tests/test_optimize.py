"""optimize() on tiny random-init models: same loss, same gradients, and the expected rewrites."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, loss_and_grads, tiny_model, twin

import sloth_fx


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_rmsnorm_rewrite_keeps_loss_and_gradients(family, lora, checkpointing):
    original = tiny_model(family, lora=lora, checkpointing=checkpointing, layers=3)
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("rmsnorm") == 2 * 3 + 1
    assert any(site.endswith("layers.2.post_attention_layernorm") for site in report.sites("rmsnorm"))
    assert "rmsnorm: rewrote input_layernorm" in sloth_fx.explain(optimized)


def test_gemma_norm_is_its_own_variant():
    original = tiny_model("gemma")
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("rmsnorm") == 2 * 2 + 1
    assert "gemma_rmsnorm" in sloth_fx.explain(optimized)


def test_layernorm_model_gets_no_rmsnorm_rewrite():
    original = tiny_model("phi")
    optimized = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    assert_same_training_step(original, optimized, batch())
    assert sloth_fx.report(optimized).count("rmsnorm") == 0
    assert "no rewrite applied" in sloth_fx.explain(optimized)


def test_two_models_in_one_process_each_get_their_rewrites():
    """Models of one class share their forwards' code objects, on which Dynamo keeps state for the
    whole process: a second model (other eps, dtype, depth, no LoRA) is still rewritten and
    reported on its own, and the first still trains through its own rewrites afterwards."""
    first_original = tiny_model("llama", lora=True, dtype=torch.bfloat16, rms_norm_eps=1e-5)
    first = sloth_fx.optimize(twin(first_original), passes=["rmsnorm"])
    loss_and_grads(first, batch())
    second_original = tiny_model("llama", layers=3)
    second = sloth_fx.optimize(twin(second_original), passes=["rmsnorm"])
    assert_same_training_step(second_original, second, batch())
    assert_same_training_step(first_original, first, batch(), rtol=2e-2, atol=2e-3)
    assert sloth_fx.report(second).count("rmsnorm") == 2 * 3 + 1
    assert sloth_fx.report(first).count("rmsnorm") == 2 * 2 + 1
    assert "rmsnorm: rewrote" in sloth_fx.explain(first) and "rmsnorm: rewrote" in sloth_fx.explain(second)


def test_optimizing_again_and_again_keeps_rewriting(monkeypatch):
    """Each optimize call compiles code objects of its own: captures made for earlier calls (or
    other models) never count against a later one's recompile limit."""
    monkeypatch.setattr(sloth_fx.capture, "_raise_recompile_limit", lambda: None)
    model = tiny_model("llama", layers=1)
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            sloth_fx.optimize(model, passes=["rmsnorm", "cross_entropy"])
            loss_and_grads(model, batch())
            report = sloth_fx.report(model)
            assert report.count("rmsnorm") == 2 + 1 and report.count("cross_entropy") == 1


def test_new_sizes_recapture_a_bounded_number_of_times():
    model = sloth_fx.optimize(tiny_model("llama", lora=True), passes=["rmsnorm"])
    for b, s in [(2, 9), (2, 13), (3, 17), (1, 5)]:
        loss_and_grads(model, batch(b=b, s=s))
    regions = sloth_fx.report(model).regions.values()
    warm = {r.name: len(r.captures) for r in regions}
    # decoder layers: the first layer (input without grad) and the others, each dynamic, plus batch 1
    assert warm["LlamaDecoderLayer"] <= 4 and all(n <= 2 for name, n in warm.items() if name != "LlamaDecoderLayer")
    for b, s in [(4, 30), (3, 11), (5, 8)]:
        loss_and_grads(model, batch(b=b, s=s))
    assert {r.name: len(r.captures) for r in regions} == warm


def test_eval_no_grad_generate_and_save_keep_working(tmp_path):
    original = tiny_model("llama", lora=True)
    model = sloth_fx.optimize(twin(original), passes=["rmsnorm"])
    loss_and_grads(model, batch())
    model.eval()
    with torch.no_grad():
        ids = batch()["input_ids"][:1, :4]
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        ref = original.eval().generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    model.save_pretrained(tmp_path)
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in original.named_parameters()}
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_verify_keeps_exact_rewrites():
    model = sloth_fx.optimize(tiny_model("llama"), passes=["rmsnorm"], verify=True)
    loss_and_grads(model, batch())
    text = sloth_fx.explain(model)
    assert "each pass checked on random inputs" in text and "dropped" not in text


def test_verify_drops_a_wrong_rewrite():
    def wrong(gm, log):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.rsqrt:
                node.target = torch.sqrt
                log.rewrite("somewhere", "deliberately wrong")
        return gm

    sloth_fx.register_pass("wrong_for_test", wrong)
    original = tiny_model("llama")
    model = sloth_fx.optimize(twin(original), passes=["wrong_for_test"], verify=True)
    assert_same_training_step(original, model, batch())
    assert "dropped by verify: wrong_for_test" in sloth_fx.explain(model)


def test_nothing_to_rewrite_is_said_and_model_still_works():
    model = sloth_fx.optimize(torch.nn.Linear(3, 3))
    assert "nothing to rewrite" in sloth_fx.explain(model)
    assert model(torch.randn(2, 3)).shape == (2, 3)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sloth_fx.optimize("not a model")
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        sloth_fx.optimize(tiny_model("llama"), passes=["nope"])
    with pytest.raises(TypeError, match="float64"):
        sloth_fx.optimize(tiny_model("llama", dtype=torch.float64))
    with pytest.raises(ValueError, match="not been through"):
        sloth_fx.explain(torch.nn.Linear(2, 2))
