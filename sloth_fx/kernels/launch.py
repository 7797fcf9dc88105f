"""One Triton launch at the host cost of the launch, not of Triton's per-call dispatch.

``kernel[grid](*args, **meta)`` binds the arguments, specialises each one (a tensor by its dtype and
whether its address is a multiple of 16 bytes; an integer by whether it is 1, a multiple of 16, and
which integer type holds it), builds a cache key from that, finds the compiled binary, checks the
globals it read and only then launches. A LoRA step of a 7B model makes about 1300 launches, and
that dispatch is a large share of the host time of a host-bound step.

:func:`launch` takes the same arguments. It builds its own key in plain Python from every property
Triton specialises on (and from the constexprs and launch options), so the key is at least as fine
as Triton's and two calls with one key run one binary. On a miss it launches through
``kernel[grid]`` (which compiles, or finds the binary in Triton's own cache) and keeps the compiled
kernel that ran; on a hit it calls that kernel's launcher directly with the arguments in signature
order, as ``kernel[grid]`` would, launch hooks included.

The direct call is taken only for CUDA tensors outside the interpreter, with ``CACHED`` true;
otherwise, and for any argument of a kind the key does not know, the launch goes through
``kernel[grid]``. ``CACHED = False`` routes every launch through Triton's own dispatch (to compare
the two, or to rule the cache out when something looks wrong).

The launch runs on the device of its first tensor argument, made current for the launch.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
import triton
from triton import knobs
from triton.runtime import driver

from .toolkit import device_guard, interpreting

__all__ = ["CACHED", "argument_classes", "launch"]

CACHED = True  # read per launch; False: every launch through kernel[grid]

_I32, _I64 = 2**31, 2**63
# Far above the keys one model makes; the bound only keeps a process that launches ever new shapes finite.
_MAX_KEPT = 4096
_compiled: dict[tuple, tuple[Any, tuple[str, ...]]] = {}


def argument_classes(args: tuple) -> tuple:
    """What Triton's compiled binary depends on in each argument, as hashable values: an integer's
    class (1, a multiple of 16 or neither) plus the width of the integer type that holds it; a
    tensor's dtype and 16-byte alignment; a float's type, never its value; None, a bool or a string
    itself. None for any other kind, whose launches then always go through Triton's dispatch.
    Integers and tensors, nearly all of a launch's arguments, are classified inline: this runs on
    every launch."""
    return tuple([
        (0 if -_I32 <= v < _I32 else 64 if -_I64 <= v < _I64 else 128) + (1 if v == 1 else 16 if v & 15 == 0 else 0)
        if type(v) is int else (v.dtype, v.data_ptr() & 15 == 0) if isinstance(v, torch.Tensor) else _scalar_class(v)
        for v in args
    ])


def _scalar_class(value: Any) -> Any:
    if type(value) is float:
        return float
    return value if value is None or type(value) in (bool, str) else None


def launch(kernel: triton.runtime.JITFunction, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``: positional kernel arguments, then the remaining parameters
    (constexprs) and the launch options (``num_warps``, ``num_stages``) by keyword."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is None:
        kernel[grid](*args, **meta)
        return
    with device_guard(first):
        if not _direct(first):
            kernel[grid](*args, **meta)
            return
        device = first.get_device()
        classes = argument_classes(args)
        key = (kernel, device, classes, tuple(meta.items()))
        hit = _compiled.get(key)
        if hit is None:
            compiled = kernel[grid](*args, **meta)
            tail = tuple(kernel.arg_names[len(args):])
            if compiled is not None and None not in classes and all(name in meta for name in tail):
                if len(_compiled) >= _MAX_KEPT:
                    _compiled.clear()
                _compiled[key] = (compiled, tail)
            return
        compiled, tail = hit
        _run(compiled, grid, device, (*args, *(meta[name] for name in tail)))


def _direct(first: torch.Tensor) -> bool:
    """Whether a launch on ``first``'s device may skip Triton's dispatch."""
    return CACHED and first.is_cuda and not interpreting()


@lru_cache(maxsize=None)
def _current_stream() -> Any:
    """Triton's query of the current CUDA stream (resolved once: ``driver.active`` is a lookup)."""
    return driver.active.get_current_stream


def _run(compiled: Any, grid: tuple[int, ...], device: int, arguments: tuple) -> None:
    """What ``kernel[grid]`` does once it has found ``compiled``: its launcher, on the current stream."""
    stream = _current_stream()(device)
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    metadata = compiled.launch_metadata(grid, stream, *arguments)
    compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, metadata,
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *arguments)
