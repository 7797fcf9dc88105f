"""The cases of the kernel microbenchmarks (:mod:`benchmarks.kernels` runs them): each fused op at
training shapes, its implementations, and the bytes and FLOPs a pass moves and computes.

Shapes: T = 16384 tokens (batch 4 x seq 4096), hidden 4096, intermediate 11008 (Llama-2) and 14336
(Mistral/Llama-3), vocab 32000 and 128256, 32 heads (8 KV for the GQA case), head_dim 128, LoRA
r=16, bf16.

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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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


def _rand(*shape: int, device: torch.device, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, device=device, dtype=torch.bfloat16) * scale
    return t.requires_grad_(grad)


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
