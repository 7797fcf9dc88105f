"""Batch sources: fixed random tokens, real-length padded and packed."""

import pytest
import torch

from benchmarks import data


def test_random_batches_shape_and_determinism():
    a = data.random_batches(100, 3, 17, n=2, seed=5)
    b = data.random_batches(100, 3, 17, n=2, seed=5)
    c = data.random_batches(100, 3, 17, n=2, seed=6)
    assert a[0].inputs["input_ids"].shape == (3, 17)
    assert torch.equal(a[1].inputs["input_ids"], b[1].inputs["input_ids"])
    assert not torch.equal(a[0].inputs["input_ids"], c[0].inputs["input_ids"])
    assert not torch.equal(a[0].inputs["input_ids"], a[1].inputs["input_ids"])
    assert torch.equal(a[0].inputs["labels"], a[0].inputs["input_ids"])
    assert int(a[0].inputs["input_ids"].max()) < 100 and a[0].real_tokens == a[0].slots == 51


def test_instruction_lengths_are_ragged_and_bounded():
    lens = data.instruction_lengths(2000, seed=1, max_len=1024)
    assert min(lens) >= data.LENGTH_MIN and max(lens) <= 1024
    med = sorted(lens)[len(lens) // 2]
    assert 0.8 * data.LENGTH_MEDIAN < med < 1.2 * data.LENGTH_MEDIAN
    assert len(set(lens)) > 200  # ragged, not a constant
    assert data.instruction_lengths(50, seed=3, max_len=64) == data.instruction_lengths(50, seed=3, max_len=64)
    with pytest.raises(ValueError):
        data.instruction_lengths(3, seed=0, max_len=2)


def test_pad_batch_pads_right_like_hf():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    b = data.pad_batch(seqs)
    assert b.inputs["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert b.inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.inputs["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]
    assert b.lengths == [3, 1, 2] and b.real_tokens == 6 and b.slots == 9


def test_pack_batch_restarts_positions_and_masks_boundaries():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    b = data.pack_batch(seqs)
    assert b.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert b.inputs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert b.inputs["labels"].tolist() == [[-100, 6, 7, -100, -100, 10]]
    assert "attention_mask" not in b.inputs
    assert b.real_tokens == b.slots == 6


def test_padded_and_packed_hold_the_same_sequences():
    pad = data.real_length_batches(500, 4, 300, n=2, seed=9, mode="padded")
    pack = data.real_length_batches(500, 4, 300, n=2, seed=9, mode="packed")
    for p, q in zip(pad, pack):
        assert p.lengths == q.lengths
        assert max(p.lengths) <= 300
        mask = p.inputs["attention_mask"].bool()
        assert torch.equal(p.inputs["input_ids"][mask], q.inputs["input_ids"][0])
        assert p.slots == 4 * max(p.lengths) and q.slots == sum(p.lengths)
    with pytest.raises(ValueError):
        data.real_length_batches(500, 4, 300, n=1, seed=9, mode="ragged")
