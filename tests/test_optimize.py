"""optimize() on tiny random-init models: same loss, same gradients, and the expected rewrites."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, loss_and_grads, tiny_model, twin, wrong_norm_pass

import sloth_fx


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


def test_verify_drops_a_wrong_rewrite(scratch_passes):
    sloth_fx.register_pass("wrong_for_test", wrong_norm_pass)
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


def test_meta_model_and_bad_labels_get_clear_errors():
    with torch.device("meta"):
        meta = tiny_model("llama")
    with pytest.raises(ValueError, match="meta device"):
        sloth_fx.optimize(meta)
    model = sloth_fx.optimize(tiny_model("llama"))
    inputs = batch()
    with pytest.raises(ValueError, match=r"labels have shape \(2, 8\) but the inputs have \(2, 9\)"):
        model(input_ids=inputs["input_ids"], labels=inputs["labels"][:, :8])
    with pytest.raises(ValueError, match="integer token ids"):
        model(input_ids=inputs["input_ids"], labels=inputs["labels"].float())
