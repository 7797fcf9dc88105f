"""Kernel microbenchmarks: each fused op, forward and forward+backward, at training shapes, against
plain PyTorch (the op's ``*_reference``) and Liger Kernel's op where one exists.

Shapes: T = 16384 tokens (batch 4 x seq 4096), hidden 4096, intermediate 11008 (Llama-2) and 14336
(Mistral/Llama-3), vocab 32000 and 128256, 32 heads (8 KV for the GQA case), head_dim 128, LoRA
r=16, bf16. Time: ``triton.testing.do_bench(..., return_mode="median")``.

Bytes moved (the roofline's numerator) count each input read once and each output written once,
at the tensors' element sizes; per op (e = 2 bytes for bf16, T tokens):

* rmsnorm   fwd: read x [T,H], w [H]; write y [T,H]                    = e(2TH + H)
            bwd: read dy, x [T,H], w [H]; write dx [T,H], dw [H]       = e(3TH + 2H)
* rope      fwd: read q [T,Hq*D], k [T,Hk*D], cos, sin [T,D]; write q', k' = e(2T(Hq+Hk)D + 2TD)
            bwd: the same with dq', dk' in and dq, dk out               = e(2T(Hq+Hk)D + 2TD)
* gated_mlp fwd: read gate, up [T,I]; write h [T,I]                    = 3eTI
            bwd: read dh, gate, up; write dgate, dup                   = 5eTI
* linear_cross_entropy and lora_linear are matmul-bound: their figure is FLOP/s against the
  measured bf16 matmul rate (FLOPs written per op below), the bytes are given for completeness:
  linear_cross_entropy fwd 2THV, bwd 2THV (the head is frozen: only d hidden);
  lora_linear fwd 2T(HO + Hr + rO), bwd 2T(OH + 2Or + 2rH) (dx through W and the adapters, dA, dB).
Rates beside the bytes: achieved bandwidth over the copy bandwidth measured in the same run
(``dst.copy_(src)`` of 1 GiB, counting read + write), FLOP/s over the measured matmul rate.

Peak extra memory (the ``fwd+bwd`` row's ``peak_extra_bytes``): one forward+backward after the
timing, input gradients cleared first, measured by :func:`peak_extra_bytes` -- the most allocated
beyond the inputs (and the output gradient) at any moment, the input gradients it writes included.
For ``linear_cross_entropy`` the ``torch`` implementation is HF's path (``lm_head`` linear,
``logits.float()``, ``F.cross_entropy(ignore_index=-100)`` mean on already shifted labels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.e2e import classify_failure

T_TOKENS = 16384
BATCH, SEQ = 4, 4096  # T = BATCH * SEQ for the ops that need a [B, S, ...] layout (rope)
HIDDEN = 4096
HEADS, HEAD_DIM = 32, 128
LORA_RANK = 16


@dataclass
class Case:
    """One op at one shape: how to make inputs, the implementations, the bytes/FLOPs per pass."""

    op: str
    shape: str
    make: Callable[[torch.device], tuple[list[torch.Tensor], dict[str, Any]]]
    impls: dict[str, Callable[..., Any]]
    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int = 0
    flops_bwd: int = 0


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


def _rand(*shape: int, device: torch.device, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, device=device, dtype=torch.bfloat16) * scale
    return t.requires_grad_(grad)


# --------------------------------------------------------------------------------------- cases


def _rmsnorm_case(h: int = HIDDEN) -> Case:
    from_sf = _lazy("sloth_fx.kernels.rmsnorm")

    def make(dev: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [_rand(T_TOKENS, h, device=dev), _rand(h, device=dev)], {}

    def liger(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # casting_mode "llama" is HF Llama's; in_place=False so repeated backward keeps dy intact.
        return LigerRMSNormFunction.apply(x, w, 1e-5, 0.0, "llama", False)

    e, t = 2, T_TOKENS
    return Case(
        "rmsnorm",
        f"T={t} H={h}",
        make,
        {
            "sloth_fx": lambda x, w: from_sf().rmsnorm(x, w, 1e-5),
            "torch": lambda x, w: from_sf().rmsnorm_reference(x, w, 1e-5),
            "liger": liger,
        },
        e * (2 * t * h + h),
        e * (3 * t * h + 2 * h),
    )


def _rope_case(kv_heads: int) -> Case:
    sf = _lazy("sloth_fx.kernels.rope")

    def make(dev: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
        # HF's layout: projections viewed [B,S,H,D] then transposed to [B,H,S,D] (not contiguous).
        q = _rand(BATCH, SEQ, HEADS, HEAD_DIM, device=dev, grad=False).transpose(1, 2).requires_grad_()
        k = _rand(BATCH, SEQ, kv_heads, HEAD_DIM, device=dev, grad=False).transpose(1, 2).requires_grad_()
        pos = torch.arange(SEQ, device=dev, dtype=torch.float32)
        inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, device=dev, dtype=torch.float32) / HEAD_DIM))
        ang = torch.outer(pos, inv)
        emb = torch.cat([ang, ang], dim=-1)
        cos = emb.cos().to(torch.bfloat16).expand(BATCH, SEQ, HEAD_DIM).contiguous()
        sin = emb.sin().to(torch.bfloat16).expand(BATCH, SEQ, HEAD_DIM).contiguous()
        return [q, k, cos, sin], {}

    def liger(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Any:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction.apply(q, k, cos, sin)

    e, t = 2, T_TOKENS
    b = e * (2 * t * (HEADS + kv_heads) * HEAD_DIM + 2 * t * HEAD_DIM)
    return Case(
        "rope",
        f"B={BATCH} S={SEQ} Hq={HEADS} Hk={kv_heads} D={HEAD_DIM}",
        make,
        {"sloth_fx": lambda *a: sf().rope(*a), "torch": lambda *a: sf().rope_reference(*a), "liger": liger},
        b,
        b,
    )


def _swiglu_case(inter: int) -> Case:
    sf = _lazy("sloth_fx.kernels.gated_mlp")

    def make(dev: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [_rand(T_TOKENS, inter, device=dev), _rand(T_TOKENS, inter, device=dev)], {}

    def liger(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(g, u)

    e, t = 2, T_TOKENS
    return Case(
        "gated_mlp",
        f"T={t} I={inter}",
        make,
        {
            "sloth_fx": lambda g, u: sf().gated_mlp(g, u),
            "torch": lambda g, u: sf().gated_mlp_reference(g, u),
            "liger": liger,
        },
        3 * e * t * inter,
        5 * e * t * inter,
    )


def _lce_case(vocab: int) -> Case:
    sf = _lazy("sloth_fx.kernels.cross_entropy")
    sf_reference = _lazy("sloth_fx.kernels.cross_entropy_reference")

    def make(dev: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
        hidden = _rand(T_TOKENS, HIDDEN, device=dev)
        weight = _rand(vocab, HIDDEN, device=dev, grad=False, scale=0.02)  # the head is frozen in LoRA
        labels = torch.randint(0, vocab, (T_TOKENS,), device=dev)
        return [hidden, weight, labels], {}

    def liger(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        return LigerFusedLinearCrossEntropyFunction.apply(h, w, y)[0]

    e, t, h = 2, T_TOKENS, HIDDEN
    return Case(
        "linear_cross_entropy",
        f"T={t} H={h} V={vocab}",
        make,
        {
            "sloth_fx": lambda h_, w, y: sf().linear_cross_entropy(h_, w, y),
            "torch": lambda h_, w, y: sf_reference().linear_cross_entropy_reference(h_, w, y),
            "liger": liger,
        },
        e * (t * h + vocab * h) + 8 * t + 4,
        e * (t * h + vocab * h + t * h) + 8 * t,
        2 * t * h * vocab,
        2 * t * h * vocab,
    )


def _lora_case(out_features: int) -> Case:
    sf = _lazy("sloth_fx.kernels.lora")
    r, t, h, o, e = LORA_RANK, T_TOKENS, HIDDEN, out_features, 2

    def make(dev: torch.device) -> tuple[list[torch.Tensor], dict[str, Any]]:
        x = _rand(t, h, device=dev)
        w = _rand(o, h, device=dev, grad=False, scale=0.02)
        a = _rand(r, h, device=dev, scale=0.02)
        b = _rand(o, r, device=dev, scale=0.02)
        return [x, w, a, b], {}

    return Case(
        "lora_linear",
        f"T={t} H={h} O={o} r={r}",
        make,
        {
            "sloth_fx": lambda x, w, a, b: sf().lora_linear(x, w, a, b, 1.0),
            "torch": lambda x, w, a, b: sf().lora_linear_reference(x, w, a, b, 1.0),
        },
        e * (t * h + o * h + r * h + o * r + t * o),
        e * (t * o + o * h + r * h + o * r + t * h + t * h + r * h + o * r),
        2 * t * (h * o + h * r + r * o),
        2 * t * (o * h + 2 * o * r + 2 * r * h),
    )


def _lazy(module: str) -> Callable[[], Any]:
    def get() -> Any:
        import importlib

        return importlib.import_module(module)

    return get


def all_cases() -> list[Case]:
    return [
        _rmsnorm_case(),
        _rope_case(HEADS),
        _rope_case(8),
        _swiglu_case(11008),
        _swiglu_case(14336),
        _lce_case(32000),
        _lce_case(128256),
        _lora_case(4096),
        _lora_case(11008),
    ]


# --------------------------------------------------------------------------------------- runner


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
