"""What every kernel here needs: the dtypes they compute in, checks that double as refusals, and
host-side launch arithmetic that is cheap from Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: about 10 µs a call
from Python, several per launch. The plain-integer versions here cost well under a microsecond,
and each kernel caches what it derives from them (block sizes, grids, warps) per shape with
``functools.lru_cache``; :func:`validate` runs a wrapper's argument checks once per signature.

An op's checks raise :class:`UnsupportedType` or :class:`UnsupportedValue` (a ``TypeError`` and a
``ValueError`` to its callers); :func:`refusal` turns the same checks into the answer to "do you
support these inputs?", which a pass gives as its reason to refuse a rewrite. The checks read
types, dtypes, shapes and devices, never a tensor's values, so they take fake tensors too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from functools import lru_cache

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "Unsupported",
    "UnsupportedType",
    "UnsupportedValue",
    "cdiv",
    "device_guard",
    "dtype_names",
    "multi_processor_count",
    "next_power_of_2",
    "refusal",
    "validate",
]

#: The floating dtypes every Triton kernel here loads, computes from (in fp32) and stores.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """``"float32, float16, bfloat16"``: dtypes as a refusal names them."""
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


# --------------------------------------------------------------------------------------------
# Checks and refusals


class Unsupported(Exception):
    """Inputs an op does not take. ``reason`` says why in the words a pass refuses a rewrite with;
    the message is ``"<op>: <reason>"``."""

    def __init__(self, op: str, reason: str) -> None:
        super().__init__(f"{op}: {reason}")
        self.reason = reason


class UnsupportedType(Unsupported, TypeError):
    """An argument of a type or dtype the op does not take."""


class UnsupportedValue(Unsupported, ValueError):
    """An argument of a shape, device or value the op does not take."""


def refusal(check: Callable[..., None], *args, **kwargs) -> str | None:
    """Why ``check(*args, **kwargs)`` rejects its arguments (the :class:`Unsupported` reason), or
    None when it accepts them. Any other exception is a bug in the check and propagates."""
    try:
        check(*args, **kwargs)
    except Unsupported as err:
        return err.reason
    return None


def validate(seen: set, signature: Callable[..., tuple], check: Callable[..., None], *args) -> None:
    """``check(*args)`` unless ``signature(*args)`` passed it before.

    ``signature`` must hold everything ``check`` reads (types, shapes, dtypes, devices, plain
    arguments), never a tensor's values; ``seen`` is the op's own set, cleared if it grows large
    (ragged batches should keep token counts out of the signature). Arguments the signature cannot
    be built or hashed from (not tensors, say) go straight to ``check``, which says what is wrong.
    """
    try:
        key = signature(*args)
        if key in seen:
            return
    except (AttributeError, TypeError):
        key = None
    check(*args)
    if key is not None:
        if len(seen) >= 4096:
            seen.clear()
        seen.add(key)


# --------------------------------------------------------------------------------------------
# Launch arithmetic and the device a launch goes to


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``b > 0``, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n``, for ``n >= 1``, as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


@lru_cache(maxsize=None)
def multi_processor_count(device: torch.device) -> int:
    """SMs of a CUDA device (a driver query: asked once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for a launch (Triton launches on the current device); a no-op,
    and nearly free, when it already is or ``t`` is not on a GPU."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(t.device)
