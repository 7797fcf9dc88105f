"""Gated MLP activation: ``act(gate) * up`` (SwiGLU for Llama/Mistral, GeGLU for Gemma).

HF's MLP is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; this op is the middle part,
``y = act(g) * u`` for two tensors ``g`` (gate) and ``u`` (up) of one shape [..., I].

Activations (``activation`` argument) and their derivatives, written out:

- ``"silu"`` (HF ``silu``/``swish``): ``a(g) = g * sig(g)``,
  ``a'(g) = sig(g) * (1 + g * (1 - sig(g)))``.
- ``"gelu_tanh"`` (HF ``gelu_pytorch_tanh``, ``F.gelu(approximate="tanh")``):
  with ``k0 = sqrt(2/pi)``, ``k1 = 0.044715``, ``t = tanh(k0 * (g + k1 * g^3))``:
  ``a(g) = 0.5 * g * (1 + t)``,
  ``a'(g) = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k0 * (1 + 3 * k1 * g^2)``.
- ``"gelu"`` (HF ``gelu``, exact erf form ``F.gelu``):
  ``a(g) = 0.5 * g * (1 + erf(g / sqrt(2)))``,
  ``a'(g) = 0.5 * (1 + erf(g / sqrt(2))) + g * exp(-g^2 / 2) / sqrt(2*pi)``.

Gradients: ``dg = dy * u * a'(g)``, ``du = dy * a(g)``.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import launch
from .toolkit import (
    SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, cdiv, dtype_names, next_power_of_2, refusal,
    tanh, use_triton, validate,
)

__all__ = ["gated_mlp_reference", "gated_mlp", "gated_mlp_supports", "GatedMLPFunction", "ACTIVATIONS"]

# Activation name -> the integer the kernels branch on at compile time.
ACTIVATIONS: dict[str, int] = {"silu": 0, "gelu_tanh": 1, "gelu": 2}

# Elements per program. An elementwise op has no row structure to exploit, so the tensors are
# treated as flat arrays cut into equal tiles (no masked tail per row when I is not a power of
# two, e.g. 11008). 1024 elements over the default 4 warps (128 threads) is 8 per thread: one
# 16-byte vector access per thread for 16-bit dtypes, two for fp32, with few registers live in
# the backward (g, u, dy and the activation terms). Smaller tensors get next_power_of_2(numel).
_MAX_BLOCK = 1024

def _activation_id(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise UnsupportedValue("gated_mlp", f"unknown activation {activation!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def gated_mlp_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` exactly as HF computes it: the activation is rounded to the input
    dtype, then the product is rounded again (two roundings in fp16/bf16).

    ``activation``: ``"silu"`` (``F.silu``), ``"gelu_tanh"`` (``F.gelu(approximate="tanh")``,
    HF's ``gelu_pytorch_tanh``) or ``"gelu"`` (``F.gelu``, erf form). Unknown names raise
    ValueError.
    """
    act = _activation_id(activation)
    if act == 0:
        a = F.silu(gate)
    elif act == 1:
        a = F.gelu(gate, approximate="tanh")
    else:
        a = F.gelu(gate)
    return a * up


@triton.jit
def _activation(g, ACT: tl.constexpr, WITH_GRAD: tl.constexpr):
    """fp32 act(g) and, when WITH_GRAD, act'(g) (else act'(g) is returned as act(g))."""
    if ACT == 0:  # silu
        sig = tl.sigmoid(g)
        a = g * sig
        if WITH_GRAD:
            da = sig * (1.0 + g * (1.0 - sig))
        else:
            da = a
    elif ACT == 1:  # gelu, tanh approximation
        k0 = 0.7978845608028654  # sqrt(2/pi)
        k1 = 0.044715
        t = tanh(k0 * (g + k1 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        if WITH_GRAD:
            da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * k1 * g * g)
        else:
            da = a
    else:  # gelu, erf form
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))  # 1/sqrt(2)
        a = g * cdf
        if WITH_GRAD:
            da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1/sqrt(2*pi)
        else:
            da = a
    return a, da


@triton.jit
def _gated_fwd_kernel(g_ptr, u_ptr, y_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(g) * u on one flat tile; fp32 math, one rounding to y's dtype."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _activation(g, ACT, False)
    tl.store(y_ptr + offs, (a * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, N, ACT: tl.constexpr, BLOCK: tl.constexpr
):
    """dg = dy * u * act'(g), du = dy * act(g) on one flat tile; act recomputed from g."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _activation(g, ACT, True)
    tl.store(dg_ptr + offs, (dy * u * da).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dy * a).to(du_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=4096)
def _tiles(n: int) -> tuple[int, int]:
    """(BLOCK, programs) for n > 0 elements: decided once per size."""
    block = min(_MAX_BLOCK, next_power_of_2(n))
    return block, cdiv(n, block)


def _launch_fwd(g: torch.Tensor, u: torch.Tensor, y: torch.Tensor, act: int) -> None:
    """y = act(g) * u; all three contiguous, same shape."""
    n = g.numel()
    if n == 0:
        return  # a zero-size grid is not a valid launch on CUDA
    block, programs = _tiles(n)
    launch(_gated_fwd_kernel, (programs,), g, u, y, n, ACT=act, BLOCK=block)


def _launch_bwd(
    dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dg: torch.Tensor, du: torch.Tensor, act: int
) -> None:
    """dg = dy * u * act'(g), du = dy * act(g); all contiguous, same shape."""
    n = g.numel()
    if n == 0:
        return
    block, programs = _tiles(n)
    launch(_gated_bwd_kernel, (programs,), dy, g, u, dg, du, n, ACT=act, BLOCK=block)


class GatedMLPFunction(torch.autograd.Function):
    """Fused ``y = act(g) * u`` with a hand-written backward.

    Forward: ``y = act(g) * u`` in fp32, rounded once to the input dtype (HF rounds twice:
    after ``act`` and after the product). ``act(g)`` is *not* stored.

    Backward: ``act`` is recomputed from ``g``; ``dg = dy * u * act'(g)``,
    ``du = dy * act(g)`` in fp32, each rounded once to the input dtype (formulas for
    ``act'`` in the module docstring; for silu ``act'(g) = sig(g) * (1 + g * (1 - sig(g)))``).

    Saved for backward: ``g`` and ``u`` (the inputs; no extra activation-sized buffer).

    The tensors are processed as flat arrays in tiles of up to 1024 elements. Non-contiguous
    inputs are made contiguous first (the projection outputs this op sees are contiguous, so
    that is a no-op in practice; flat indexing needs a dense layout).

    dg and du are new tensors, not written into the saved g/u buffers: the kernel's raw writes
    would not bump autograd's version counters, so a second backward through the same graph
    (``retain_graph=True``), or any other holder of the gate/up projection outputs (a hook, a
    graph output, another node that saved them), would silently read gradients instead of
    activations. Whether that can happen is a property of the surrounding graph, not something
    this op can check, so it does not take the risk.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        gate: torch.Tensor,
        up: torch.Tensor,
        activation: str = "silu",
    ) -> torch.Tensor:
        act = _activation_id(activation)
        # Flat indexing needs dense row-major storage; a no-op for projection outputs.
        g = gate.contiguous()
        u = up.contiguous()
        y = torch.empty_like(g, memory_format=torch.contiguous_format)
        _launch_fwd(g, u, y, act)
        ctx.save_for_backward(g, u)
        ctx.act = act
        return y

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        g, u = ctx.saved_tensors
        dy = dy.contiguous()  # e.g. an expanded gradient of a .sum(); flat indexing needs dense
        dg = torch.empty_like(g, memory_format=torch.contiguous_format)
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        _launch_bwd(dy, g, u, dg, du, ctx.act)
        return (
            dg if ctx.needs_input_grad[0] else None,
            du if ctx.needs_input_grad[1] else None,
            None,
        )


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise UnsupportedType("gated_mlp", f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if gate.shape != up.shape:
        raise UnsupportedValue("gated_mlp", f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape "
                                            "(broadcasting is not fused)")
    if gate.device != up.device:
        raise UnsupportedValue("gated_mlp", f"gate on {gate.device} and up on {up.device}")


def _check_dtypes(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dtype != up.dtype:
        raise UnsupportedType("gated_mlp", f"gate {gate.dtype} and up {up.dtype} must have one dtype")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedType("gated_mlp", f"dtype {gate.dtype} is not one of {dtype_names(SUPPORTED_DTYPES)}")


def _check_fused(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    _activation_id(activation)
    _check(gate, up)
    _check_dtypes(gate, up)


def gated_mlp_supports(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> str | None:
    """None when :func:`gated_mlp` runs its fused kernel for arguments like these, else the reason.

    The checks :func:`gated_mlp` raises on (activation, shapes, devices, and the dtypes that the
    fused path needs), answered instead of raised; they read no tensor's values, so fake tensors
    (an fx node's example value) do.
    """
    return refusal(_check_fused, gate, up, activation)


def _signature(gate: torch.Tensor, up: torch.Tensor) -> tuple:
    """Everything :func:`_check` reads."""
    return type(gate), type(up), gate.shape, up.shape, gate.device, up.device


def _dtypes(gate: torch.Tensor, up: torch.Tensor) -> tuple:
    return gate.dtype, up.dtype


# Argument signatures that passed _check, and dtype pairs that passed _check_dtypes.
_VALID: set[tuple] = set()
_VALID_DTYPES: set[tuple] = set()


def gated_mlp(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up`` for ``gate``, ``up`` of one shape [..., I] and dtype.

    Same values as :func:`gated_mlp_reference` up to rounding (the fused path rounds once, from
    fp32). :class:`GatedMLPFunction` when the tensors are where Triton runs, the reference
    otherwise. ValueError for an unknown activation, mismatched shapes or devices; TypeError for
    mismatched or unsupported dtypes on the Triton path (float16, bfloat16, float32 are).
    """
    _activation_id(activation)
    validate(_VALID, _signature, _check, gate, up)
    if not use_triton(gate, up):
        return gated_mlp_reference(gate, up, activation)
    validate(_VALID_DTYPES, _dtypes, _check_dtypes, gate, up)
    return GatedMLPFunction.apply(gate, up, activation)
