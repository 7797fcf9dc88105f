"""Which form each LoRA linear of a group takes at the shapes it runs, and a record of those taken.

:func:`group_plans` is the plan (:func:`~sloth_fx.kernels.lora_plan.lora_plan`) of every linear of
a group reading one ``x``, for a token count, on a device: what
:func:`~sloth_fx.kernels.lora.lora_linear_group` runs when no plan is given. One rule is the
group's: the siblings read ``x`` once for all their ``x·Aᵀ``, so a stacked forward saves that read
only when every sibling stacks; when the linears' own plans stack some forwards but not all, the
group is planned again without stacked forwards (a group that would gain only as a whole, each
sibling short of it alone, is not found: rare, and the gain a read of ``x``).

:func:`plans_taken` is the same plans, as the op takes them at run time: it records the forms of
each group shape with the range of token counts they ran at (:func:`forms_taken`), which the LoRA
pass's explain text reads. Each new token count is recorded once (the plans are cached per
count), so a call costs one dictionary look-up.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .lora_plan import LoRAPlan, lora_plan
from .roofline import measure_device_rates

__all__ = ["GroupShape", "forget_forms_taken", "forms_taken", "group_plans", "plans_taken"]

#: (in, outs, ranks, compute dtype, adapters' dtype, 4-bit bases, training): a group as planned
GroupShape = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.dtype, tuple[bool, ...], bool]
#: forms of each linear, ((forward, dX), ...)
Forms = tuple[tuple[str, str], ...]

# group shape -> forms -> [fewest, most] tokens they ran at
_TAKEN: dict[GroupShape, dict[Forms, list[int]]] = {}


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


@lru_cache(maxsize=4096)
def plans_taken(tokens: int, shape: GroupShape, device: torch.device) -> tuple[LoRAPlan, ...]:
    """:func:`group_plans`, the forms recorded for :func:`forms_taken` (once per token count)."""
    plans = group_plans(tokens, shape, device)
    span = _TAKEN.setdefault(shape, {}).setdefault(tuple((p.forward, p.backward_dx) for p in plans), [tokens, tokens])
    span[0], span[1] = min(span[0], tokens), max(span[1], tokens)
    return plans


def forms_taken(shape: GroupShape) -> dict[Forms, tuple[int, int]]:
    """The forms a group of ``shape`` ran in, in this process (every model's groups of that
    shape) since the record began, each with the fewest and the most tokens it ran at; empty
    before its first call."""
    return {forms: (lo, hi) for forms, (lo, hi) in _TAKEN.get(shape, {}).items()}


def forget_forms_taken() -> None:
    """Begin the record again (a test, or a run that should not count the ones before it)."""
    plans_taken.cache_clear()
    _TAKEN.clear()
