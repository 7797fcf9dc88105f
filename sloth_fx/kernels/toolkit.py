"""What every kernel here needs: the dtypes they compute in, where they run, checks that double as
refusals, host-side launch arithmetic that is cheap from Python, the device a launch goes to, the
Triton helpers they share, and what a bitsandbytes 4-bit weight is.

Where an op runs: Triton on CUDA tensors, its plain-PyTorch reference elsewhere. Under the Triton
interpreter (``TRITON_INTERPRET=1``) CPU tensors take the Triton path too, so the CPU test suite
runs the real kernels on small shapes.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions: about 10 µs a call
from Python, several per launch. The plain-integer versions here cost well under a microsecond,
and each kernel caches what it derives from them (block sizes, grids, warps) per shape with
``functools.lru_cache``; :func:`validate` runs a wrapper's argument checks once per signature.

Token counts are not specialised. Triton compiles a variant of a kernel for each integer argument
that is 1, divisible by 16, or neither; an argument that is the step's token count (rows of a
norm, positions of a rope, the long side of a LoRA product) changes class from step to step on
ragged data, and the first step whose count is a multiple of 16 (or 1) would stop to compile every
such kernel again.
Those arguments are loop bounds and masks along rows, where divisibility buys nothing, so each
kernel lists them in ``do_not_specialize``; sizes along a row's contiguous dimension stay
specialised (their divisibility vectorises the loads). ``lowrank_mm``'s M and K are kept: each is
the token count in some products and the contiguous size in others. It runs only on steps of at
least the LoRA op's ``HOST_BOUND_TOKENS`` tokens, but there too a ragged step whose count falls in
a new class stops once to compile every product again (4.6 s on an H200 when that constant was
2048: see the LoRA op's module doc).

An op's checks raise :class:`UnsupportedType` or :class:`UnsupportedValue` (a ``TypeError`` and a
``ValueError`` to its callers); :func:`refusal` turns the same checks into the answer to "do you
support these inputs?", which a pass gives as its reason to refuse a rewrite. The checks read
types, dtypes, shapes and devices, never a tensor's values, so they take fake tensors too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from functools import lru_cache

import torch
import triton
import triton.language as tl

__all__ = [
    "SUPPORTED_DTYPES",
    "Unsupported",
    "UnsupportedType",
    "UnsupportedValue",
    "base_weight_shape",
    "cdiv",
    "dense_weight",
    "device_guard",
    "dtype_names",
    "interpreting",
    "is_4bit",
    "multi_processor_count",
    "next_power_of_2",
    "refusal",
    "release_dequant_scratch",
    "tanh",
    "use_triton",
    "validate",
]

#: The floating dtypes every Triton kernel here loads, computes from (in fp32) and stores.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    """``"float32, float16, bfloat16"``: dtypes as a refusal names them."""
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


# --------------------------------------------------------------------------------------------
# Where an op runs


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (read per call: tests switch it)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor lives where the Triton kernels can run."""
    for t in tensors:  # a plain loop: no generator per call, and CUDA tensors never read the environment
        if not t.is_cuda and not (t.device.type == "cpu" and interpreting()):
            return False
    return True


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


# --------------------------------------------------------------------------------------------
# Triton helpers


@triton.jit
def tanh(x):
    """tanh of fp32 ``x`` to about an ulp, relative to the value also near 0 (Triton's core has
    no tanh, and libdevice's does not run in the interpreter).

    |x| < 0.5: odd Taylor polynomial to x^15 (the next term is below 1e-8 relative there), which
    avoids the cancellation of ``1 - exp(-2|x|)`` near 0. Otherwise
    ``sign(x) * (1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` in (0, 0.37], no overflow for any x.
    """
    ax = tl.abs(x)
    xs = tl.where(ax < 0.5, x, 0.0)  # the polynomial only sees its own range (no overflow for large x)
    x2 = xs * xs
    # tanh x = x - x^3/3 + 2x^5/15 - 17x^7/315 + 62x^9/2835 - 1382x^11/155925
    #          + 21844x^13/6081075 - 929569x^15/638512875 + ...
    p = -929569.0 / 638512875.0
    p = p * x2 + 21844.0 / 6081075.0
    p = p * x2 - 1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = xs + xs * x2 * p
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    return tl.where(ax < 0.5, small, big)


# --------------------------------------------------------------------------------------------
# bitsandbytes 4-bit weights

_DENSE_TYPES = (torch.Tensor, torch.nn.Parameter)


def is_4bit(weight: torch.Tensor) -> bool:
    """True for a bitsandbytes 4-bit weight (``Params4bit``: anything with a ``quant_state``;
    nf4 or fp4, with or without double quantization): packed storage, dequantized to compute.

    Asks the live weight: a fake copy of one (an fx node's example value) has lost its quant
    state and answers False."""
    # a plain tensor or parameter has no quant_state: skip the (raising) attribute lookup
    return type(weight) not in _DENSE_TYPES and getattr(weight, "quant_state", None) is not None


def base_weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """The shape a base weight computes with: a 4-bit weight's quantized ``[out, in]`` (from its
    quant state: its own storage is packed uint8), any other weight's own shape."""
    return tuple(weight.quant_state.shape) if is_4bit(weight) else tuple(weight.shape)


_SCRATCH: dict[tuple[torch.device, tuple[int, ...], torch.dtype], torch.Tensor] = {}


def release_dequant_scratch() -> None:
    """Free the CUDA scratch buffers that 4-bit weights are dequantized into."""
    _SCRATCH.clear()


def dense_weight(weight: torch.Tensor, dtype: torch.dtype, *, scratch: bool = False,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """A base weight as a dense ``[out, in]`` matrix in ``dtype``.

    A dense weight is returned as is (it must already be ``dtype``'s: callers check). A 4-bit
    weight is dequantized with ``bitsandbytes.functional.dequantize_4bit`` into its quantization
    dtype, then cast to ``dtype`` if that differs. With ``scratch`` on CUDA it is written into one
    reusable buffer per (device, shape, dtype) (bitsandbytes' ``out=``), valid only until the next
    such dequantization; :func:`release_dequant_scratch` frees them. On CPU bitsandbytes has no
    ``out=`` kernel, so each dequantization allocates.

    ``out`` (an ``[out, in]`` tensor in ``dtype``, a part of a larger buffer: LoRA's stacked form)
    receives the weight instead and is returned: a dense weight is copied into it; a 4-bit one
    is dequantized straight into it where bitsandbytes can write it (CUDA, the quantization
    dtype, contiguous), else through the scratch (or a fresh tensor) and copied.
    """
    if not is_4bit(weight):
        return weight if out is None else out.copy_(weight)
    state = weight.quant_state
    import bitsandbytes.functional as bnbf  # only a 4-bit weight, made by bitsandbytes, gets here

    cuda = weight.device.type == "cuda"
    if out is not None and cuda and out.dtype == state.dtype and out.is_contiguous():
        return bnbf.dequantize_4bit(weight.data, state, out=out)
    if scratch and cuda:
        key = (weight.device, tuple(state.shape), state.dtype)
        buf = _SCRATCH.get(key)
        if buf is None:
            buf = _SCRATCH[key] = torch.empty(tuple(state.shape), dtype=state.dtype, device=weight.device)
        dense = bnbf.dequantize_4bit(weight.data, state, out=buf)
    else:
        dense = bnbf.dequantize_4bit(weight.data, state)
    if out is not None:
        return out.copy_(dense)
    return dense if dense.dtype == dtype else dense.to(dtype)
