"""Padded and packed batches through ``optimize`` (padding-free by default) train as HF trains them:
same loss and gradients, with and without checkpointing, and ``explain`` says what was done."""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, tiny_model, twin

import sloth_fx

pytestmark = pytest.mark.usefixtures("reference_ops")


def padded_batch():
    inputs = batch(b=3, s=10)
    mask = torch.ones_like(inputs["input_ids"])
    mask[1, 6:] = 0
    mask[2, 1:] = 0  # a row of length 1
    inputs["labels"][0, 4] = -100  # an ignored label inside a sequence
    return {**inputs, "attention_mask": mask, "labels": inputs["labels"].masked_fill(mask == 0, -100)}


def packed_row():
    """Three sequences in one row, as DataCollatorWithFlattening makes it."""
    inputs = batch(b=1, s=12)
    inputs["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    inputs["labels"][0, [0, 5, 8]] = -100
    return inputs


@pytest.mark.parametrize("checkpointing", [False, True])
def test_padded_batch_trains_padding_free_exactly(checkpointing):
    original = tiny_model("llama", lora=True, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original))
    assert_same_training_step(original, optimized, padded_batch())
    assert "padding-free, applied (latest): padding-free: 3 rows (right padding), 17 of 30 tokens" in sloth_fx.explain(optimized)
    off = sloth_fx.optimize(twin(original), padding_free=False)
    assert_same_training_step(original, off, padded_batch())
    assert "padding-free" not in sloth_fx.explain(off) and off.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_row_trains_as_hf_trains_it(checkpointing):
    """With checkpointing HF runs without a cache and reads the boundaries from position_ids; without
    it HF's training call builds a cache and then does not: sloth_fx computes what HF computes."""
    original = tiny_model("mistral", lora=True, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original))
    assert_same_training_step(original, optimized, packed_row())
    decision = sloth_fx.report(optimized).padding_free
    assert decision == ({"applied": "packed row: 3 sequences given boundaries"} if checkpointing else {"not applied": "no padding"})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_collator_boundaries_train_as_hf_trains_them(checkpointing):
    """A collator's cu_seq_lens beside position_ids (DataCollatorWithFlattening's flash-attention
    kwargs): HF's sdpa never reads them, and without checkpointing its cache-building call reads no
    boundaries at all: sloth_fx computes the same, packing per sequence only where HF does."""
    original = tiny_model("llama", lora=True, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original))
    cu = torch.tensor([0, 5, 8, 12], dtype=torch.int32)
    inputs = {**packed_row(), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 5, "max_length_k": 5}
    assert_same_training_step(original, optimized, inputs)
    decision = sloth_fx.report(optimized).padding_free
    assert decision == ({"applied": "packed row with boundaries"} if checkpointing else {"not applied": "no padding"})
