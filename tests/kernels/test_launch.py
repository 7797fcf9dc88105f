"""The cached launch: what its key tells apart, when it launches directly, and on the GPU that the
direct launch computes what Triton's own dispatch does, bit for bit."""

from __future__ import annotations

import pytest
import torch

import sloth_fx.kernels.launch as launch_module
from sloth_fx.kernels.launch import argument_classes, launch
from sloth_fx.kernels.lowrank_mm import lowrank_mm


def argument_class(value):
    return argument_classes((value,))[0]


def test_argument_class_tells_apart_what_triton_specialises_on():
    buf = torch.zeros(64, dtype=torch.float32)
    assert argument_class(buf) == argument_class(buf[4:])  # 16 bytes on: still aligned
    assert argument_class(buf) != argument_class(buf[1:])  # 4 bytes on: not
    assert argument_class(buf) != argument_class(buf.to(torch.bfloat16))
    ints = [1, 2, 16, 17, 32, 2**31 - 16, 2**31, -16, 2**63]
    classes = [argument_class(v) for v in ints]
    assert classes[0] != classes[1] != classes[2]  # 1, neither, a multiple of 16
    assert classes[1] == classes[3] and classes[2] == classes[4] == classes[7]
    assert classes[5] != classes[6] != classes[8]  # 32-bit, 64-bit, wider
    assert argument_class(0.5) == argument_class(3.0)  # floats: never by value
    assert argument_class(True) != argument_class(False) and argument_class(None) is None
    assert argument_class(object()) is None and argument_class(torch.nn.Parameter(buf)) == argument_class(buf)


class _Kernel:
    """Stands in for a JITFunction: records ``kernel[grid](...)`` and returns a compiled handle."""

    arg_names = ["x", "n", "BLOCK", "FLAG"]

    def __init__(self) -> None:
        self.dispatched = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.dispatched.append((grid, args, meta))
            return ("compiled", len(self.dispatched))
        return run


@pytest.fixture
def direct_calls(monkeypatch):
    """Every launch may go direct (as CUDA tensors would); direct launches recorded, not run."""
    calls = []
    monkeypatch.setattr(launch_module, "_direct", lambda first: launch_module.CACHED)
    monkeypatch.setattr(launch_module, "_run", lambda compiled, grid, device, args: calls.append((compiled, grid, args)))
    monkeypatch.setattr(launch_module, "_compiled", {})
    return calls


def test_a_hit_launches_the_compiled_kernel_with_every_argument_in_order(direct_calls):
    kernel, x = _Kernel(), torch.zeros(32)
    launch(kernel, (3,), x, 17, BLOCK=64, FLAG=True, num_warps=4)
    assert len(kernel.dispatched) == 1 and not direct_calls  # a miss: Triton's dispatch
    launch(kernel, (5, 2), x, 33, BLOCK=64, FLAG=True, num_warps=4)  # 33: the same class as 17
    assert len(kernel.dispatched) == 1
    assert direct_calls == [(("compiled", 1), (5, 2), (x, 33, 64, True))]


@pytest.mark.parametrize("change", ["unaligned", "dtype", "int class", "constexpr", "option"])
def test_anything_triton_specialises_on_misses(direct_calls, change):
    kernel, x = _Kernel(), torch.zeros(32)
    args, meta = (x, 17), {"BLOCK": 64, "FLAG": True, "num_warps": 4}
    launch(kernel, (1,), *args, **meta)
    if change == "unaligned":
        args = (x[1:], 17)
    elif change == "dtype":
        args = (x.double(), 17)
    elif change == "int class":
        args = (x, 16)
    elif change == "constexpr":
        meta = {**meta, "BLOCK": 128}
    else:
        meta = {**meta, "num_warps": 8}
    launch(kernel, (1,), *args, **meta)
    assert len(kernel.dispatched) == 2 and not direct_calls


def test_never_cached_without_every_constexpr_or_with_an_unknown_argument(direct_calls):
    kernel, x = _Kernel(), torch.zeros(32)
    for _ in range(2):
        launch(kernel, (1,), x, 17, BLOCK=64)  # FLAG left to its default: order unknown here
        launch(kernel, (1,), x, object(), BLOCK=64, FLAG=False)
    assert len(kernel.dispatched) == 4 and not direct_calls


def test_a_dispatch_that_returns_no_kernel_is_not_kept(direct_calls):
    """A stand-in that launches nothing (the tests' poisoned kernels) must stay in charge."""
    x = torch.zeros(32)
    silent = type("Silent", (_Kernel,), {"__getitem__": lambda self, grid: lambda *a, **k: None})()
    for _ in range(2):
        launch(silent, (1,), x, 17, BLOCK=64, FLAG=True)
    assert not direct_calls and not launch_module._compiled


def test_cached_false_always_dispatches(direct_calls, monkeypatch):
    monkeypatch.setattr(launch_module, "CACHED", False)
    kernel, x = _Kernel(), torch.zeros(32)
    for _ in range(3):
        launch(kernel, (1,), x, 17, BLOCK=64, FLAG=True)
    assert len(kernel.dispatched) == 3 and not direct_calls


@pytest.mark.gpu
def test_gpu_direct_launch_equals_tritons_dispatch(monkeypatch):
    """lowrank_mm at odd and round shapes, unaligned views and every operand mode: the second call
    of each (a cache hit) gives the bits the dispatch gives."""
    monkeypatch.setattr(launch_module, "_compiled", {})
    gen = torch.Generator(device="cuda").manual_seed(5)
    dtypes = [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
              (torch.float16, torch.float32)]
    for m, k, n in [(1, 1, 1), (37, 129, 5), (64, 4096, 16), (4096, 64, 48), (300, 1000, 17)]:
        for da, db in dtypes:
            a_base = torch.randn(m, k + 1, device="cuda", generator=gen).to(da)
            b = torch.randn(k, n, device="cuda", generator=gen).to(db)
            for a in (a_base[:, :k], a_base[:, 1:]):  # aligned, and 2 or 4 bytes off
                out_base = torch.randn(m, n + 1, device="cuda", generator=gen)
                for accumulate in (False, True):
                    monkeypatch.setattr(launch_module, "CACHED", False)
                    expected = lowrank_mm(a, b, alpha=0.5, out=out_base[:, 1:].clone(), accumulate=accumulate)
                    monkeypatch.setattr(launch_module, "CACHED", True)
                    for _ in range(2):  # miss, then hit
                        got = lowrank_mm(a, b, alpha=0.5, out=out_base[:, 1:].clone(), accumulate=accumulate)
                        assert torch.equal(got, expected), (m, k, n, da, db, accumulate)
    assert launch_module._compiled  # the hits ran from the cache


class _Compiled:
    """What the recording stand-in hands back for a launch: the kernel and its launch options."""

    def __init__(self, kernel, options):
        self.kernel, self.options = kernel, options


class _Recording:
    """Wraps a kernel: ``kernel[grid]`` runs it (the interpreter) and returns a :class:`_Compiled`."""

    def __init__(self, kernel):
        self.kernel, self.arg_names, self.dispatched = kernel, kernel.arg_names, 0

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.dispatched += 1
            self.kernel[grid](*args, **meta)
            return _Compiled(self.kernel, {k: v for k, v in meta.items() if k in ("num_warps", "num_stages")})
        return run


def _every_op():
    """Each kernel of the package, run by its op on small CPU inputs, gradients included."""
    from sloth_fx.kernels.add_rmsnorm import add_rmsnorm
    from sloth_fx.kernels.cross_entropy import linear_cross_entropy
    from sloth_fx.kernels.gated_mlp import gated_mlp
    from sloth_fx.kernels.rmsnorm import rmsnorm
    from sloth_fx.kernels.rope import rope

    gen = torch.Generator().manual_seed(3)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype).requires_grad_()

    x, w = rand(5, 24), rand(24)
    outs = [rmsnorm(x, w, 1e-6, normed_dtype=torch.float32), *add_rmsnorm(x, rand(5, 24), w, 1e-6)]
    q, k = rand(1, 4, 5, 16), rand(1, 2, 5, 16)
    outs += [*rope(q, k, torch.randn(1, 5, 16, generator=gen), torch.randn(1, 5, 16, generator=gen))]
    outs.append(gated_mlp(rand(5, 24), rand(5, 24)))
    hidden = rand(6, 24, dtype=torch.bfloat16)
    outs.append(linear_cross_entropy(hidden, rand(40, 24, dtype=torch.bfloat16), torch.tensor([1, 5, -100, 39, 0, 7])))
    sum(o.float().sum() for o in outs).backward()
    grads = [t.grad for t in (x, w, q, k, hidden)]
    return [o.detach() for o in outs] + grads + [lowrank_mm(torch.randn(37, 20, generator=gen), torch.randn(20, 5, generator=gen))]


def test_every_kernel_is_kept_and_its_direct_launch_gives_the_same_bits(monkeypatch):
    """Run on the interpreter with direct launches allowed: every kernel of the package is kept
    after its first launch (each launch site passes every constexpr by keyword), and the second
    run, whose launches all go direct with the arguments in signature order, gives the first
    run's bits."""
    from sloth_fx.kernels import add_rmsnorm, cross_entropy_rows, gated_mlp, lowrank_mm as mm, rmsnorm_kernel, rope_kernel

    kernels = {(m, name) for m in (add_rmsnorm, cross_entropy_rows, gated_mlp, mm, rmsnorm_kernel, rope_kernel)
               for name in dir(m) if name.endswith("_kernel") and not name.startswith("__")
               and hasattr(getattr(m, name), "arg_names")}
    for module, name in kernels:
        monkeypatch.setattr(module, name, _Recording(getattr(module, name)))
    direct = []

    def run_direct(compiled, grid, device, arguments):
        direct.append(compiled.kernel)
        compiled.kernel[grid](*arguments, **compiled.options)

    monkeypatch.setattr(launch_module, "_direct", lambda first: True)
    monkeypatch.setattr(launch_module, "_run", run_direct)
    monkeypatch.setattr(launch_module, "_compiled", {})
    first = _every_op()
    dispatched = [getattr(module, name).dispatched for module, name in kernels]
    direct.clear()
    second = _every_op()
    assert [getattr(module, name).dispatched for module, name in kernels] == dispatched  # no miss
    assert set(direct) == {getattr(module, name).kernel for module, name in kernels} and len(kernels) == 9
    for a, b in zip(first, second):
        assert torch.equal(a, b)
