"""How long a matrix product or an element-wise pass takes on a device, by the roofline.

A product ``[m, k]·[k, n]`` costs ``2mkn`` FLOPs and moves at least ``(mk + kn + mn)`` elements
(``+ mn`` when it accumulates into its output, ``C += A·B``, which reads C too); on a device
with matmul rate ``R`` and bandwidth ``W`` it takes about ``max(flops/R, bytes/W)`` (bound by
whichever resource it exhausts first). An element-wise pass over ``b`` bytes (reads plus writes)
takes ``b/W``. The rates are a :class:`DeviceRates`: measured on the current CUDA device by
:func:`measure_device_rates`, or the H100 default. :mod:`sloth_fx.kernels.lora_plan` prices
LoRA's forms with these.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "DEFAULT_RATES",
    "ZERO",
    "Cost",
    "DeviceRates",
    "check_positive_int",
    "matmul_cost",
    "measure_device_rates",
    "roofline_cost",
    "stream_cost",
]


@dataclass(frozen=True)
class DeviceRates:
    """What one device sustains: 16-bit matmul rate (FLOP/s), memory bandwidth (bytes/s, reads
    plus writes of a large copy), and the fp32 matmul rate (FLOP/s, under the process's TF32
    setting when measured)."""

    flops: float = 7.3e14  # bf16 dense matmul measured on the H100 80GB (benchmarks, 2026-11-24)
    bandwidth: float = 3.0e12  # device-to-device copy, same run
    flops_fp32: float = 5.0e13  # H100 SXM fp32 without TF32: ~75% of the 67 TFLOP/s peak
    name: str = "H100 80GB (default)"

    def __post_init__(self) -> None:
        for attr in ("flops", "bandwidth", "flops_fp32"):
            value = getattr(self, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DeviceRates.{attr} must be a positive finite number, got {value!r}")

    def matmul_rate(self, elem_bytes: int) -> float:
        """The matmul rate for elements of ``elem_bytes`` bytes: 16-bit (<= 2) or fp32."""
        return self.flops if elem_bytes <= 2 else self.flops_fp32


DEFAULT_RATES = DeviceRates()


def _median_cuda_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 3) -> float:
    """Median over ``reps`` runs of ``fn``, each timed with a pair of CUDA events (ms)."""
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


@lru_cache(maxsize=None)
def _measure_cuda(index: int) -> DeviceRates:
    device = torch.device("cuda", index)
    # autocast would turn the fp32 product into a bf16 one; no graph is wanted either
    with torch.cuda.device(device), torch.autocast("cuda", enabled=False), torch.no_grad():
        # 4096³ bf16: 137 GFLOP a product, on the GEMM plateau, in 3 x 32 MiB of memory.
        n = 4096
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        ms16 = _median_cuda_ms(lambda: torch.mm(a, b, out=c))
        # fp32 is ~15x slower: 2048³ keeps the measurement short.
        n32 = 2048
        a, b = (torch.randn(n32, n32, device=device) for _ in range(2))
        c = torch.empty(n32, n32, device=device)
        ms32 = _median_cuda_ms(lambda: torch.mm(a, b, out=c))
        del a, b, c
        # 256 MiB: far beyond the L2 cache (50 MiB on an H100), so this is DRAM bandwidth.
        nbytes = 256 * 2**20
        src = torch.empty(nbytes, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        ms_copy = _median_cuda_ms(lambda: dst.copy_(src))
        del src, dst
        name = torch.cuda.get_device_name(device)
    return DeviceRates(
        flops=2.0 * n**3 / (ms16 * 1e-3),
        bandwidth=2.0 * nbytes / (ms_copy * 1e-3),  # every byte read once and written once
        flops_fp32=2.0 * n32**3 / (ms32 * 1e-3),
        name=f"{name} (measured)",
    )


def measure_device_rates(device: torch.device | str | int | None = None) -> DeviceRates:
    """The matmul rates and memory bandwidth of a CUDA device, measured once per device.

    A 4096³ bf16 product, a 2048³ fp32 product and a 256 MiB device copy, each the median of 10
    runs timed with CUDA events after 3 warm-up runs. Not on CPU: there (or without CUDA, or if
    the measurement runs out of memory) it returns :data:`DEFAULT_RATES` without measuring.
    Cached per device index.
    """
    if device is None:
        if not torch.cuda.is_available():
            return DEFAULT_RATES
        device = torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_RATES
    try:
        return _measure_cuda(device.index if device.index is not None else torch.cuda.current_device())
    except torch.cuda.OutOfMemoryError:
        return DEFAULT_RATES


@dataclass(frozen=True)
class Cost:
    """FLOPs, bytes moved and estimated seconds; costs add."""

    flops: float
    bytes: float
    seconds: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.seconds + other.seconds)


ZERO = Cost(0.0, 0.0, 0.0)


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (a size or an element width)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def matmul_cost(m: int, k: int, n: int, elem_bytes: int, rates: DeviceRates = DEFAULT_RATES, *,
                accumulate: bool = False) -> Cost:
    """``[m, k]·[k, n]``: ``2mkn`` FLOPs, ``(mk + kn + mn)·elem_bytes`` bytes (``+ mn·elem_bytes``
    when ``accumulate``: ``C += A·B`` reads C), ``max(flops / rate, bytes / bandwidth)`` seconds."""
    for name, value in (("m", m), ("k", k), ("n", n), ("elem_bytes", elem_bytes)):
        check_positive_int(name, value)
    moved = float(m * k + k * n + m * n * (2 if accumulate else 1)) * elem_bytes
    return roofline_cost(2.0 * m * k * n, moved, elem_bytes, rates)


def roofline_cost(flops: float, nbytes: float, elem_bytes: int, rates: DeviceRates = DEFAULT_RATES) -> Cost:
    """A product whose bytes are counted by the caller (an operand read once for several products,
    say): ``max(flops / rate, nbytes / bandwidth)`` seconds, the rate that of ``elem_bytes``."""
    return Cost(float(flops), float(nbytes), max(flops / rates.matmul_rate(elem_bytes), nbytes / rates.bandwidth))


def stream_cost(nbytes: float, rates: DeviceRates = DEFAULT_RATES) -> Cost:
    """A memory-bound element-wise pass reading plus writing ``nbytes`` in all."""
    return Cost(0.0, float(nbytes), nbytes / rates.bandwidth)
