"""Padding-free calls: the padded run's loss and gradients from one packed row, or a reason."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DataCollatorWithFlattening, DynamicCache

from sloth_fx.batching.packed_attention import install_packed_attention
from sloth_fx.batching.padding_free import PaddingFree, plan
from tiny_models import tiny_model, twin

FAMILIES = ["llama", "mistral"]
RIGHT = [6, 9, 1, 4]  # real tokens per row of 9: a row without padding and a row of length 1
LEFT = [6, 9, 2, 4]


def _batch(lengths: list[int], left: bool = False, s: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 101, (len(lengths), s), generator=gen)
    cols = torch.arange(s)
    lengths_t = torch.tensor(lengths)[:, None]
    mask = (cols >= s - lengths_t) if left else (cols < lengths_t)
    labels = ids.masked_fill(~mask, -100)
    labels[0, 2] = -100  # an ignored label inside a sequence
    labels[3, -2 if left else 1] = -100
    if left:  # the last pad token would predict the first real one: make it predict nothing
        labels[(cols == s - lengths_t) & (lengths_t < s)] = -100
    return {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}


def _padding_free(model: torch.nn.Module, inputs: dict[str, Any]) -> tuple[Any, PaddingFree]:
    p = plan(inputs)
    assert isinstance(p, PaddingFree), p
    return p.restore(model(**p.kwargs)), p


def _assert_same_step(family: str, inputs: dict[str, Any], checkpointing: bool = False, **extra: Any) -> Any:
    """Padded run on plain sdpa against the padding-free run: loss, every LoRA gradient, and the
    logits at real tokens (zeros at padding); the restored output."""
    model = tiny_model(family, lora=True, checkpointing=checkpointing)
    padded = twin(model)
    assert install_packed_attention(model) is None
    ref = padded(**inputs, **extra)
    ref.loss.backward()
    out, p = _padding_free(model, {**inputs, **extra})
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    params = dict(model.named_parameters())
    names = [n for n, q in padded.named_parameters() if q.requires_grad]
    assert names
    for name in names:
        torch.testing.assert_close(params[name].grad, dict(padded.named_parameters())[name].grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    real = inputs["attention_mask"].bool()[..., None]
    torch.testing.assert_close(out.logits, ref.logits * real, rtol=1e-5, atol=1e-5)
    assert p.kwargs["position_ids"].shape == (1, int(inputs["attention_mask"].sum()))  # no padding left
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding(family: str) -> None:
    _assert_same_step(family, _batch(RIGHT))


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_reproduces_the_padded_positions(family: str) -> None:
    """Left padding: HF gives real tokens positions s_b..S-1 (0..S-1 regardless of the mask);
    the packed row keeps them, so even RoPE sees the same numbers."""
    p = plan(_batch(LEFT, left=True))
    assert p.kwargs["position_ids"][0, :6].tolist() == [3, 4, 5, 6, 7, 8] and "left padding" in p.note
    _assert_same_step(family, _batch(LEFT, left=True))


def test_given_position_ids_num_items_and_checkpointing() -> None:
    """Explicit position ids (a collator's cumsum of the mask), Trainer's num_items_in_batch, and
    activation checkpointing carry through."""
    inputs = _batch(RIGHT)
    inputs["position_ids"] = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
    _assert_same_step("llama", inputs, checkpointing=True, num_items_in_batch=torch.tensor(11))


def test_inputs_embeds_and_hidden_states() -> None:
    """inputs_embeds are packed differentiably; hidden states come back in the padded layout."""
    inputs = _batch(RIGHT)
    embed = tiny_model("mistral").get_input_embeddings()
    embeds = embed(inputs.pop("input_ids")).detach()
    out = _assert_same_step("mistral", {**inputs, "inputs_embeds": embeds}, output_hidden_states=True)
    assert all(h.shape == (4, 9, 64) for h in out.hidden_states)
    assert all(not h[inputs["attention_mask"] == 0].any() for h in out.hidden_states)


def test_packed_row_only_gains_boundaries() -> None:
    """An already-packed row keeps its tokens, positions and labels; it gains the boundaries
    (where HF finds them: wherever the position id does not grow by one) and a mask with nothing
    masked, so that no dense mask is built; the loss is HF's packed run's. (HF detects a packed
    row only without a cache: with the config's default use_cache=True in training it attends
    across sequences, so its reference run says use_cache=False.)"""
    lengths = [3, 1, 4]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "position_ids": positions, "labels": ids}
    p = plan(inputs)
    assert p.kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 8] and p.kwargs["max_length_q"] == 4
    assert p.kwargs["labels"] is ids and p.kwargs["attention_mask"].tolist() == [[1] * 8]
    model = tiny_model("llama", lora=True)
    hf = twin(model)
    assert install_packed_attention(model) is None
    loss = p.restore(model(**p.kwargs)).loss
    torch.testing.assert_close(loss, hf(**inputs, use_cache=False).loss, rtol=1e-6, atol=1e-6)


def test_collator_boundaries_are_kept() -> None:
    """A row that comes with its boundaries (return_flash_attn_kwargs=True) keeps them and only
    gains the mask with nothing masked."""
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    p = plan(dict(batch))
    assert p.kwargs["cu_seq_lens_q"] is batch["cu_seq_lens_q"] and p.kwargs["attention_mask"].tolist() == [[1] * 5]
    assert p.restore("output") == "output"


def test_packed_labels_and_count() -> None:
    """Each sequence's first label is -100 in the packed row; as many labels are counted as the
    padded run counts (its shifted labels that are not -100)."""
    inputs = _batch(RIGHT)
    p = plan(inputs)
    cu = p.kwargs["cu_seq_lens_q"].tolist()
    assert cu == [0, 6, 15, 16, 20] and p.kwargs["max_length_q"] == 9
    labels = p.kwargs["labels"][0]
    assert labels[cu[:-1]].eq(-100).all()
    assert int((inputs["labels"][:, 1:] != -100).sum()) == int((labels[1:] != -100).sum())


def test_a_fully_padded_row_is_dropped() -> None:
    inputs = _batch([5, 0, 3, 2])
    assert plan(inputs).kwargs["cu_seq_lens_q"].tolist() == [0, 5, 8, 10]
    _assert_same_step("llama", inputs)


@pytest.mark.parametrize(("change", "reason"), [
    (lambda b: b.update(attention_mask=torch.ones_like(b["attention_mask"])), "no padding"),
    (lambda b: b.pop("attention_mask"), "no padding"),
    (lambda b: b["labels"].__setitem__((0, 8), 7), "labels are not -100 at every padded position"),
    (lambda b: b.update(attention_mask=b["attention_mask"][:, None, None, :].expand(4, 1, 9, 9)), "custom"),
    (lambda b: b["attention_mask"].__setitem__((1, 4), 0), "not one contiguous run"),
    (lambda b: b["attention_mask"].__setitem__((1, 4), 2), "not 0/1"),
    (lambda b: b.update(cache=DynamicCache()), "cached generation"),
    (lambda b: b.update(past_key_values=DynamicCache()), "cached generation"),
    (lambda b: b.update(logits_to_keep=1), "logits_to_keep"),
    (lambda b: b.update(output_attentions=True), "output_attentions"),
    (lambda b: b.update(return_dict=False), "return_dict=False"),
    (lambda b: b.update(cu_seq_lens_q=torch.tensor([0, 9])), "boundaries already given, with an attention mask"),
])
def test_refusals(change: Any, reason: str) -> None:
    inputs = _batch(RIGHT)
    change(inputs)
    result = plan(inputs)
    assert isinstance(result, str) and reason in result, result


def test_left_padding_refused_when_a_pad_token_predicts() -> None:
    """Left padding whose first real label is not -100: the padded loss counts a term from the
    last pad token's logits, which a run without padding cannot compute."""
    inputs = _batch(LEFT, left=True)
    inputs["labels"][0, 3] = inputs["input_ids"][0, 3]
    assert "left padding: the last pad token predicts" in plan(inputs)


def test_no_dense_mask_reaches_the_layers() -> None:
    """The padding-free call's mask creation returns None: attention gets boundaries, no [T×T] mask."""
    model = tiny_model("llama", lora=True)
    assert install_packed_attention(model) is None
    seen = []
    attention = model.get_base_model().model.layers[0].self_attn
    attention.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    for inputs in (_batch(RIGHT), _batch(LEFT, left=True)):
        model(**plan(inputs).kwargs)
    assert [k["attention_mask"] for k in seen] == [None, None]
    assert all(k["cu_seq_lens_q"] is not None for k in seen)
