"""Peak extra memory of the kernel microbenchmarks: the helper's arithmetic on a fake counter, and
the kernel table's column on a fake result set."""

import pytest
import torch

from benchmarks import report
from benchmarks.kernels import peak_extra_bytes

MIB = 1024**2


class FakeMemory:
    """torch.cuda's four memory calls over a counter that ``alloc``/``free`` move."""

    def __init__(self, allocated: int, peak: int) -> None:
        self.allocated, self.peak, self.calls = allocated, peak, []

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n

    def synchronize(self, device):
        self.calls.append(("synchronize", device))

    def memory_allocated(self, device):
        return self.allocated

    def max_memory_allocated(self, device):
        return self.peak

    def reset_peak_memory_stats(self, device):
        self.peak = self.allocated


def test_peak_extra_is_the_peak_over_the_baseline_not_over_an_earlier_peak():
    mem = FakeMemory(allocated=1000, peak=9000)  # an earlier, larger peak must not count

    def run():  # logits 300, then freed down, then a smaller buffer: the peak is 300 over the inputs
        mem.alloc(300)
        mem.free(250)
        mem.alloc(100)
        mem.free(150)

    assert peak_extra_bytes(run, "dev", mem) == 300
    assert mem.calls[0] == ("synchronize", "dev") and mem.calls[-1] == ("synchronize", "dev")


def test_peak_extra_counts_what_run_leaves_allocated():
    mem = FakeMemory(allocated=500, peak=500)
    assert peak_extra_bytes(lambda: mem.alloc(64), "dev", mem) == 64  # e.g. the input gradients


@pytest.mark.gpu
def test_peak_extra_on_cuda_counts_a_temporary():
    dev = torch.device("cuda")
    x = torch.ones(1024, 1024, device=dev)
    extra = peak_extra_bytes(lambda: (x * 2).sum(), dev)
    assert 4 * MIB <= extra < 5 * MIB


def _lce_rows(shape, peaks):
    return [
        {"op": "linear_cross_entropy", "shape": shape, "impl": impl, "status": "ok", "phase": phase, "ms": ms,
         "bytes": 1, "gbps": 1.0, "bw_frac": 0.1, "tflops": 500.0, "mm_frac": 0.6,
         "peak_extra_bytes": peak if phase == "fwd+bwd" else None}
        for impl, peak in peaks.items()
        for phase, ms in (("fwd", 10.0), ("fwd+bwd", 30.0))
    ]


def test_kernel_table_peak_column_and_share_of_torch():
    shape = "T=16384 H=4096 V=128256"
    rows = _lce_rows(shape, {"sloth_fx": 256 * MIB, "torch": 20480 * MIB, "liger": 1024 * MIB})
    rows.append({"op": "rmsnorm", "shape": "T=16384 H=4096", "impl": "sloth_fx", "status": "ok", "phase": "fwd+bwd",
                 "ms": 0.3, "bytes": 1, "gbps": 1.0, "bw_frac": 0.9, "tflops": None, "mm_frac": None})  # an old row
    rows.append({"op": "rope", "shape": "s", "impl": "liger", "status": "failed", "reason": "not installed: x"})
    t = report.kernel_table({"copy_bandwidth": 3e12, "matmul_flops": 7.5e14, "rows": rows})
    lines = t.splitlines()
    head = next(l for l in lines if l.startswith("| op"))
    assert head.endswith("| peak extra MiB |")
    ncol = head.count("|")
    assert all(l.count("|") == ncol for l in lines if l.startswith("| "))
    assert f"| {shape} | sloth_fx | fwd+bwd | 30.000 |" in t
    cell = lambda impl, phase: next(l for l in lines if f"| {impl} | {phase} |" in l).rsplit("|", 2)[1].strip()
    assert cell("sloth_fx", "fwd+bwd") == "256 (1.2% of torch)"
    assert cell("liger", "fwd+bwd") == "1024 (5.0% of torch)"
    assert cell("torch", "fwd+bwd") == "20480"
    assert cell("sloth_fx", "fwd") == "—"
    assert next(l for l in lines if "| rmsnorm |" in l).endswith("| — |")  # no figure, no share
