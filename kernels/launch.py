"""Host-side launch arithmetic shared by the kernels: cheap from Python, decided once per shape.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: about 10 µs a call
from Python, several per launch. The plain-integer versions here cost well under a microsecond,
and each kernel caches what it derives from them (block sizes, grids, warps) per shape with
``functools.lru_cache``; :func:`validate` runs a wrapper's argument checks once per signature.
Nothing here looks at a tensor's values.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import lru_cache

import torch

__all__ = ["cdiv", "next_power_of_2", "multi_processor_count", "device_guard", "validate"]


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
