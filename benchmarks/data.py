"""Batch sources: fixed random tokens, and real-length instruction-style batches, padded or packed.

Every source is a pure function of its seed, so each system's subprocess sees the same batches.

Real-length source. No instruction data set (nor a tokenizer for one) can be loaded offline from
a package here, so the lengths are drawn from a stated model rather than read from a data set:
a log-normal with median ``LENGTH_MEDIAN`` tokens and log-space spread ``LENGTH_SIGMA``, clipped to
``[LENGTH_MIN, max_len]``. That is an assumption meant to resemble single-turn instruction-tuning
data (prompt + response of a few hundred tokens, a long right tail), not a fit to a measured data
set; benchmarks/README.md says the same. The token ids are random; only the lengths matter to speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LENGTH_MEDIAN = 190  # tokens: assumed median of prompt+response length (see module docstring)
LENGTH_SIGMA = 0.9  # log-space standard deviation: gives a tail to ~5x the median at the 97th pct.
LENGTH_MIN = 8  # shortest sequence drawn: a prompt and a reply are never shorter than a few tokens
IGNORE_INDEX = -100  # the label HF's loss ignores
PAD_ID = 0  # pad token id of the random-init models (any id works: padded positions are masked)


@dataclass
class Batch:
    """One step's inputs. ``inputs`` goes to ``model(**inputs)``; ``lengths`` are the real
    sequence lengths inside it (what the attention FLOPs and the useful tokens count)."""

    inputs: dict[str, torch.Tensor]
    lengths: list[int] = field(default_factory=list)

    @property
    def real_tokens(self) -> int:
        return int(sum(self.lengths))

    @property
    def slots(self) -> int:
        """Token positions the model computes on, padding included."""
        return int(self.inputs["input_ids"].numel())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch({k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}, list(self.lengths))


def random_batches(vocab: int, batch: int, seq: int, n: int, seed: int) -> list[Batch]:
    """``n`` batches of uniformly random token ids in ``[0, vocab)``, shape ``[batch, seq]``;
    labels are the input ids (the model shifts them), no padding. Batch ``i`` depends only on
    ``(seed, i)``."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)
        out.append(Batch({"input_ids": ids, "labels": ids.clone()}, [seq] * batch))
    return out


def instruction_lengths(
    n: int, seed: int, max_len: int, median: float = LENGTH_MEDIAN, sigma: float = LENGTH_SIGMA
) -> list[int]:
    """``n`` sequence lengths from the log-normal length model, clipped to ``[LENGTH_MIN, max_len]``."""
    if max_len < LENGTH_MIN:
        raise ValueError(f"max_len must be at least {LENGTH_MIN}, got {max_len}")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    lens = torch.exp(math.log(median) + sigma * z).round().clamp(LENGTH_MIN, max_len)
    return [int(v) for v in lens.tolist()]


def random_sequences(lengths: list[int], vocab: int, seed: int) -> list[torch.Tensor]:
    """One random token sequence per length (ids in ``[1, vocab)``: 0 is kept for padding)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g, dtype=torch.long) for n in lengths]


def pad_batch(seqs: list[torch.Tensor], pad_id: int = PAD_ID) -> Batch:
    """Right-pad to the longest sequence of the batch, as ``DataCollatorWithPadding`` with the
    default ``padding=True`` / ``padding_side="right"`` does; ``attention_mask`` is 0 on padding and
    the labels are ``IGNORE_INDEX`` there (as HF's language-modelling collator sets them)."""
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
        labels[i, : len(s)] = s
    return Batch({"input_ids": ids, "attention_mask": mask, "labels": labels}, [len(s) for s in seqs])


def pack_batch(seqs: list[torch.Tensor]) -> Batch:
    """Concatenate into one row without padding, as ``DataCollatorWithFlattening`` does:
    ``position_ids`` restart at 0 for each sequence (transformers derives the block-diagonal causal
    mask from them; no ``attention_mask`` is passed) and the label of each sequence's first token is
    ``IGNORE_INDEX`` so that no token is predicted across a boundary."""
    if not seqs:
        raise ValueError("pack_batch needs at least one sequence")
    ids = torch.cat(seqs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(s), dtype=torch.long) for s in seqs]).unsqueeze(0)
    labels = ids.clone()
    start = 0
    for s in seqs:
        labels[0, start] = IGNORE_INDEX
        start += len(s)
    return Batch({"input_ids": ids, "position_ids": pos, "labels": labels}, [len(s) for s in seqs])


def real_length_batches(vocab: int, batch: int, max_len: int, n: int, seed: int, mode: str) -> list[Batch]:
    """``n`` batches of ``batch`` sequences with instruction-style lengths (at most ``max_len``),
    ``mode="padded"`` or ``"packed"``. The padded and packed sources of one seed hold the very
    same sequences, so their losses are comparable."""
    if mode not in ("padded", "packed"):
        raise ValueError(f"mode must be 'padded' or 'packed', got {mode!r}")
    out = []
    for i in range(n):
        lens = instruction_lengths(batch, seed * 1_000_003 + i, max_len)
        seqs = random_sequences(lens, vocab, seed * 1_000_003 + i)
        out.append(pad_batch(seqs) if mode == "padded" else pack_batch(seqs))
    return out


def batches_for(cfg: "object", n: int, seed: int) -> list[Batch]:
    """The batches a :class:`benchmarks.configs.Config` trains on."""
    vocab = cfg.shape.vocab  # type: ignore[attr-defined]
    if cfg.data == "random":  # type: ignore[attr-defined]
        return random_batches(vocab, cfg.batch, cfg.seq, n, seed)  # type: ignore[attr-defined]
    return real_length_batches(vocab, cfg.batch, cfg.seq, n, seed, cfg.data)  # type: ignore[attr-defined]
