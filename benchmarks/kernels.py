"""Kernel microbenchmarks: each case of :mod:`benchmarks.kernel_cases` (a fused op at a training
shape, against plain PyTorch, the op's ``*_reference``, and Liger Kernel's op where one exists),
forward and forward+backward.

Time: ``triton.testing.do_bench(..., return_mode="median")``.

Rates beside the bytes and FLOPs of each case (:mod:`benchmarks.kernel_cases` says what they count):
achieved bandwidth over the copy bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB,
counting read + write), FLOP/s over the measured matmul rate.

Peak extra memory (the ``fwd+bwd`` row's ``peak_extra_bytes``): one forward+backward after the
timing, input gradients cleared first, measured by :func:`peak_extra_bytes` -- the most allocated
beyond the inputs (and the output gradient) at any moment, the input gradients it writes included.
For ``linear_cross_entropy`` the ``torch`` implementation is HF's path (``lm_head`` linear,
``logits.float()``, ``F.cross_entropy(ignore_index=-100)`` mean on already shifted labels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.e2e import classify_failure
from benchmarks.kernel_cases import Case, all_cases


def _bench(fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds by ``triton.testing.do_bench``."""
    import triton.testing

    return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return 2 * n**3 / (ms / 1e3)


def peak_extra_bytes(run: Callable[[], Any], device: torch.device, memory: Any = torch.cuda) -> int:
    """Bytes allocated at the peak of ``run()`` beyond what was allocated just before it.

    Reads ``memory.memory_allocated`` (the baseline: the inputs), resets the peak counter, runs,
    synchronises and returns ``max_memory_allocated - baseline``. ``memory`` is ``torch.cuda`` or
    anything with its ``synchronize``/``memory_allocated``/``reset_peak_memory_stats``/
    ``max_memory_allocated`` taking a device (tests pass a fake counter).
    """
    memory.synchronize(device)
    before = memory.memory_allocated(device)
    memory.reset_peak_memory_stats(device)
    run()
    memory.synchronize(device)
    return memory.max_memory_allocated(device) - before


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]


def bench_case(case: Case, impl: str, dev: torch.device, copy_bw: float, mm_rate: float) -> list[dict[str, Any]]:
    """Forward and forward+backward rows of one implementation of one case."""
    base = {"op": case.op, "shape": case.shape, "impl": impl}
    fn = case.impls[impl]
    try:
        inputs, _ = case.make(dev)
        leaves = [t for t in inputs if t.requires_grad]
        # The loss's gradient is 1; other ops get random output gradients. Only their shapes are
        # taken from this call: its graph (HF's: the [T, V] logits) is dropped at once.
        like = torch.ones_like if case.op == "linear_cross_entropy" else torch.randn_like
        grads = [like(o) for o in _outputs(fn(*inputs))]

        def fwd() -> None:
            fn(*inputs)

        def fwd_bwd() -> None:
            torch.autograd.backward(_outputs(fn(*inputs)), grads)

        ms_f = _bench(fwd)
        ms_fb = _bench(fwd_bwd, grad_to_none=leaves)
        for t in leaves:
            t.grad = None
        peak = peak_extra_bytes(fwd_bwd, dev)
    except Exception as e:  # a missing op, an unsupported shape, OOM: this row says so
        torch.cuda.empty_cache()
        return [dict(base, status="failed", reason=classify_failure(e))]
    rows = []
    for pas, ms, nbytes, nflops, peak_bytes in (
        ("fwd", ms_f, case.bytes_fwd, case.flops_fwd, None),
        ("fwd+bwd", ms_fb, case.bytes_fwd + case.bytes_bwd, case.flops_fwd + case.flops_bwd, peak),
    ):
        s = ms / 1e3
        rows.append(
            dict(
                base,
                status="ok",
                phase=pas,
                ms=ms,
                bytes=nbytes,
                gbps=nbytes / s / 1e9,
                bw_frac=nbytes / s / copy_bw,
                tflops=nflops / s / 1e12 if nflops else None,
                mm_frac=nflops / s / mm_rate if nflops else None,
                peak_extra_bytes=peak_bytes,
            )
        )
    del inputs, grads
    torch.cuda.empty_cache()
    return rows


def run_kernels(
    ops: list[str] | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure the copy bandwidth and matmul rate, then every case; the result as a dict."""
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    mm = matmul_rate(dev)
    rows: list[dict[str, Any]] = []
    cases = [c for c in all_cases() if ops is None or c.op in ops]
    for i, case in enumerate(cases):
        for impl in case.impls:
            if progress:
                progress(f"[{i + 1}/{len(cases)}] {case.op} {case.shape} {impl}")
            rows.extend(bench_case(case, impl, dev, copy_bw, mm))
    return {"copy_bandwidth": copy_bw, "matmul_flops": mm, "rows": rows}
