"""Padding-free calls: a padded batch trained as one packed row, with the padded run's numbers.

``plan(kwargs)`` takes the keyword arguments of a causal LM's training forward and returns either
a :class:`PaddingFree` (``kwargs``: the call to make on a model with
``sloth_fx.batching.packed_attention.install_packed_attention`` applied; ``restore``: the output mapped back
to the padded layout) or the reason it leaves the call alone.

Why the numbers are the padded run's. Let row b's real tokens be the contiguous run
``s_b <= t < e_b`` of its ``attention_mask``. In the padded run a real token attends to the real
tokens at or before it (padding keys are masked; right padding lies after it) at the position
ids HF gives it (``position_ids`` when given, else ``0..S-1``, padding or not, so left padding
starts real tokens at ``s_b``). The packed row keeps those tokens, in order, with the same
position ids, and the boundaries ``cu = [0, len_0, len_0+len_1, ...]`` make packed attention do the
same per sequence. ForCausalLMLoss sums ``-log p(labels[t+1] | logits[t])`` over the t whose shifted
label is not -100 and divides by their count (or ``num_items_in_batch``). The padded run's terms
are the packed run's if and only if

- every label at padding is -100 (no term predicts or is predicted by padding on the right), and
- the first real label of a row with padding before it is -100 (else the last pad token's
  logits predict it, a term with no real token behind it);

and the packed labels set the first label of each sequence to -100, so that the last token of
one sequence predicts nothing across the boundary (in the padded run that label, at column 0 or
after padding, is never a target either). Same terms, same count: same loss, same gradients, up
to the reduction order of the kernels.

An already-packed row (``position_ids`` restarting, no mask, as ``DataCollatorWithFlattening`` and
TRL's ``padding_free`` make it) only gains its boundaries, found where HF finds them (wherever
the position id does not grow by one); its labels are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

BOUNDARIES = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class PaddingFree:
    """The padding-free call (``kwargs``) and how to map its output back (``restore``).

    ``index``: the flat ``B*S`` positions of the packed tokens, in order (None when the call was
    already packed and nothing moves); ``shape``: the padded ``(B, S)``; ``note``: what was done,
    for ``explain``."""

    kwargs: dict[str, Any]
    note: str
    index: torch.Tensor | None = None
    shape: tuple[int, int] = (0, 0)

    def restore(self, output: Any) -> Any:
        """The model's output in the padded layout: ``logits`` and each of ``hidden_states``
        ``[1, T, *]`` become ``[B, S, *]`` with zeros at padding (differentiably); ``loss`` is
        already the padded run's. The packed call runs without a cache, so ``cache`` is None."""
        if self.index is None:
            return output
        if getattr(output, "logits", None) is not None:
            output.logits = self._unpack(output.logits)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(self._unpack(h) for h in output.hidden_states)
        return output

    def _unpack(self, x: torch.Tensor) -> torch.Tensor:
        b, s = self.shape
        flat = x.new_zeros(b * s, *x.shape[2:]).index_put((self.index,), x[0])
        return flat.view(b, s, *x.shape[2:])


def plan(kwargs: dict[str, Any]) -> PaddingFree | str:
    """The padding-free form of a causal LM's training call, or why there is none.

    Reasons (the call is then made as it is): no padding; boundaries given with a mask; a cache or
    ``past_key_values`` (generation); ``logits_to_keep``; ``output_attentions``;
    ``return_dict=False``; an attention mask that is not 2-D, not 0/1, or not one contiguous run
    per row; labels (or ``shift_labels``) not -100 at padding; a left-padded row whose first real
    label is not -100."""
    reason = _unsupported(kwargs)
    if reason is not None:
        return reason
    tokens = call_tokens((), kwargs)
    mask = kwargs.get("attention_mask")
    if any(kwargs.get(k) is not None for k in BOUNDARIES):
        if mask is not None:
            return "sequence boundaries already given, with an attention mask"
        # the collator's own boundaries: only spare HF its dense packed mask
        return PaddingFree({**kwargs, "attention_mask": _all_ones(tokens, torch.long)}, "packed row with boundaries")
    if mask is None:
        return _packed_row(kwargs, tokens)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return "the attention mask is custom (not a 2-D padding mask)"
    if bool(mask.all()):
        return "no padding"
    return _padded(kwargs, tokens, mask)


def _unsupported(kwargs: dict[str, Any]) -> str | None:
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return "a cache is given (cached generation)"
    if not isinstance(kwargs.get("logits_to_keep", 0), int) or kwargs.get("logits_to_keep", 0) != 0:
        return "logits_to_keep is set"
    if kwargs.get("output_attentions"):
        return "output_attentions: attention weights have no padded layout to restore"
    if kwargs.get("return_dict") is False:
        return "return_dict=False"
    tokens = call_tokens((), kwargs)
    if tokens is None or tokens.dim() < 2:
        return "no batched input_ids or inputs_embeds"
    return None


def call_tokens(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A causal-LM call's tokens: its ``input_ids`` (by keyword, or first positional), else its
    ``inputs_embeds``; None when it has neither."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if ids is not None else kwargs.get("inputs_embeds")


def _packed_row(kwargs: dict[str, Any], tokens: torch.Tensor) -> PaddingFree | str:
    positions = kwargs.get("position_ids")
    if positions is None:
        return "no padding"
    positions = positions.expand(tokens.shape[0], -1).reshape(-1)
    starts = _starts(positions, tokens.shape[1])
    if starts.numel() == tokens.shape[0]:
        return "no padding"
    cu = torch.cat([starts, starts.new_tensor([positions.numel()])])
    note = f"packed row: {starts.numel()} sequences given boundaries"
    return PaddingFree({**kwargs, **_boundaries(cu), "attention_mask": _all_ones(tokens, torch.long)}, note)


def _starts(positions: torch.Tensor, row: int) -> torch.Tensor:
    """Flat indices where a sequence starts: each row's first token, and wherever the position id
    does not grow by one (HF's find_packed_sequence_indices, per row of the flattened batch)."""
    flat = torch.arange(positions.numel(), device=positions.device)
    new = torch.ones_like(positions, dtype=torch.bool)
    new[1:] = positions[1:] != positions[:-1] + 1
    return flat[new | (flat % row == 0)]


def _padded(kwargs: dict[str, Any], tokens: torch.Tensor, mask: torch.Tensor) -> PaddingFree | str:
    b, s = mask.shape
    real = mask.bool()
    if not bool(((mask == 0) | (mask == 1)).all()):
        return "the attention mask is not 0/1"
    lengths = real.sum(1)
    first = real.int().argmax(1)
    cols = torch.arange(s, device=mask.device)
    if not torch.equal(real, (cols >= first[:, None]) & (cols < (first + lengths)[:, None])):
        return "an attention-mask row is not one contiguous run of real tokens"
    for name in ("labels", "shift_labels"):
        labels = kwargs.get(name)
        if labels is not None and bool((labels[~real] != -100).any()):
            return f"{name} are not -100 at every padded position"
    labels = kwargs.get("labels")
    if labels is not None and bool((labels.gather(1, first[:, None])[first > 0] != -100).any()):
        return "left padding: the last pad token predicts the first real token (its label is not -100)"

    index = real.reshape(-1).nonzero().squeeze(1)
    kept = lengths[lengths > 0]
    cu = torch.cat([kept.new_zeros(1), kept.cumsum(0)])
    positions = kwargs.get("position_ids")
    positions = cols.expand(b, s) if positions is None else positions.expand(b, s)
    packed = {**kwargs, **_boundaries(cu), "use_cache": False, "position_ids": positions.reshape(-1)[index][None]}
    packed["attention_mask"] = _all_ones(index[None], mask.dtype)
    for name in ("input_ids", "inputs_embeds", "shift_labels"):
        if kwargs.get(name) is not None:
            packed[name] = kwargs[name].reshape(b * s, *kwargs[name].shape[2:])[index][None]
    if labels is not None:
        packed_labels = labels.reshape(-1)[index]
        packed_labels[cu[:-1]] = -100  # nothing predicts the first token of a sequence across a boundary
        packed["labels"] = packed_labels[None]
    side = "left" if bool((first > 0).any()) else "right"
    note = f"padding-free: {b} rows ({side} padding), {index.numel()} of {b * s} tokens"
    return PaddingFree(packed, note, index=index, shape=(b, s))


def _boundaries(cu: torch.Tensor) -> dict[str, Any]:
    """The FlashAttention-style kwargs; ``cu`` is marked dynamic so that a new count of sequences
    does not recapture (the max length, a Python int, recaptures once and is dynamic from then on)."""
    cu = cu.to(torch.int32)
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _all_ones(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A padding mask with nothing masked: sdpa's mask function returns None for it, and HF's
    packed-row detection, which would build a dense [T×T] mask, only runs when there is no mask."""
    return torch.ones(like.shape[:2], dtype=dtype, device=like.device)
