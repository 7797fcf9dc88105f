"""Which form each LoRA linear of a group takes at the shapes it runs, and a record of those taken.

:func:`group_plans` is the plan (:func:`~sloth_fx.kernels.lora_plan.lora_plan`) of every linear of
a group reading one ``x``, for a token count, on a device: what
:func:`~sloth_fx.kernels.lora.lora_linear_group` runs when no plan is given. One rule is the
group's: the siblings read ``x`` once for all their ``x·Aᵀ``, so a stacked forward saves that read
only when every sibling stacks; when the linears' own plans stack some forwards but not all, the
group is planned again without stacked forwards (a group that would gain only as a whole, each
sibling short of it alone, is not found: rare, and the gain a read of ``x``).

:class:`FormsTaken` records the forms a group of one shape ran in, with the range of token counts
they ran at, for explain: into the records of the capture that runs (:func:`recording_into`, set
by the capture's runner around its graph, and by its backend while the passes run, so that the
LoRA pass's note holds the record the op fills). The records live with each model's report, so
each model's explain says what its own groups ran. The forms are a function of the group's shape
and token count, so groups of one shape in one capture share a record. Each new token count is
recorded once: a call costs a context look-up and a set look-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from functools import lru_cache

import torch

from .lora_plan import LoRAPlan, lora_plan
from .roofline import measure_device_rates

__all__ = ["FormsRecords", "FormsTaken", "GroupShape", "group_plans", "record_forms", "recording_into", "records"]

#: (in, outs, ranks, compute dtype, adapters' dtype, 4-bit bases, training): a group as planned
GroupShape = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.dtype, tuple[bool, ...], bool]
#: forms of each linear, ((forward, dX), ...)
Forms = tuple[tuple[str, str], ...]


class FormsTaken:
    """The forms one fused group ran in, each with the fewest and the most tokens it ran at."""

    def __init__(self) -> None:
        self.spans: dict[Forms, tuple[int, int]] = {}
        self._counts: set[int] = set()

    def record(self, tokens: int, plans: tuple[LoRAPlan, ...]) -> None:
        """A call of ``tokens`` tokens ran ``plans`` (recorded once per token count)."""
        if tokens in self._counts:
            return
        self._counts.add(tokens)
        forms = tuple((p.forward, p.backward_dx) for p in plans)
        lo, hi = self.spans.get(forms, (tokens, tokens))
        self.spans[forms] = (min(lo, tokens), max(hi, tokens))


@lru_cache(maxsize=4096)
def group_plans(tokens: int, shape: GroupShape, device: torch.device) -> tuple[LoRAPlan, ...]:
    """The plan of each linear of a group of ``shape`` at ``tokens`` tokens, at ``device``'s
    measured rates (the module doc for the group's rule). Cached per arguments."""
    in_features, outs, ranks, dtype, adapter_dtype, quantized, training = shape
    rates = measure_device_rates(device)

    def plans(stack_forward: bool) -> tuple[LoRAPlan, ...]:
        return tuple(lora_plan(tokens, in_features, o, r, dtype.itemsize, rates,
                               adapter_elem_bytes=adapter_dtype.itemsize, training=training, siblings=len(outs),
                               base_4bit=q, stack_forward=stack_forward)
                     for o, r, q in zip(outs, ranks, quantized))

    chosen = plans(True)
    stacked = sum(p.forward == "stacked" for p in chosen)
    return plans(False) if 0 < stacked < len(chosen) else chosen


FormsRecords = dict[GroupShape, FormsTaken]
_RECORDS: ContextVar[FormsRecords | None] = ContextVar("sloth_fx_lora_forms", default=None)


@contextlib.contextmanager
def recording_into(into: FormsRecords) -> Iterator[None]:
    """While this lasts, the groups that run record their forms in ``into``."""
    token = _RECORDS.set(into)
    try:
        yield
    finally:
        _RECORDS.reset(token)


def records(shape: GroupShape) -> FormsTaken | None:
    """The record of groups of ``shape`` in the capture being rewritten or run; None outside one."""
    into = _RECORDS.get()
    if into is None:
        return None
    taken = into.get(shape)
    if taken is None:  # not setdefault: it would make a record at every call of the op
        taken = into[shape] = FormsTaken()
    return taken


def record_forms(tokens: int, shape: GroupShape, plans: tuple[LoRAPlan, ...]) -> None:
    """A group of ``shape`` ran ``plans`` at ``tokens`` tokens: into the running capture's record."""
    taken = records(shape)
    if taken is not None:
        taken.record(tokens, plans)
