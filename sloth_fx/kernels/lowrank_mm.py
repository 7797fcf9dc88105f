"""The thin products of LoRA, accumulated in fp32 whatever the operands' dtypes, rounded once.

``lowrank_mm(a, b, alpha, out, accumulate)`` computes::

    out = alpha · a·b              a [M, K], b [K, N], any strides, fp16/bf16/fp32 each
    out = out + alpha · a·b        with accumulate=True (out read, then written once)

with the sum over K accumulated in fp32 and the result rounded once into ``out``'s dtype
(fp32 when ``out`` is not given). It is not a differentiable op: :mod:`sloth_fx.kernels.lora_function`
calls it from its written-out backward. In a LoRA step every product with the rank ``r`` as one
of its three dimensions goes through it:

    xa  = x·Aᵀ              [T, in]·[in, r]      x in the model's dtype, A often fp32 (PEFT)
    y  += s·xa·Bᵀ           [T, r]·[r, out]      in place on the 16-bit base output
    g   = s·dY·B            [T, out]·[out, r]
    dB  = s·dYᵀ·xa          [out, T]·[T, r]      long K = T: split over K
    dA  = gᵀ·x              [r, T]·[T, in]       long K = T: split over K
    dX += g·A               [T, r]·[r, in]       in place on the 16-bit input gradient

Reading a 16-bit operand as it is and converting it in registers is the point: PEFT's
fp32 adapters otherwise cost an fp32 copy of ``x``, of ``dY`` and of every ``[T, out]`` sum.

Kernel: one program per ``[BLOCK_M, BLOCK_N]`` tile of ``out`` and per slice of K. How a tile
product is formed depends on the operands' dtypes:

- two 16-bit operands of one dtype go to the tensor cores as they are (products exact in fp32);
- bf16 against fp32 (the model's activations against PEFT's fp32 adapters): the fp32 tile is cut
  into three bf16 tiles ``hi + mid + lo`` that hold its 24 significant bits exactly, and three
  bf16 tensor-core products (each exact in fp32) are accumulated: fp32's own accuracy at bf16's
  rate, where TF32 would drop 13 bits of the adapter and ``tf32x3`` ran 3x slower (H100);
- fp32 with fp32 (``xa·Bᵀ``, ``g·A``: K is the rank): both tiles cut so, and the six bf16
  products of pieces whose weights reach 2⁻¹⁶ accumulated (the three dropped are 2⁻²⁴ and
  below): fp32 FMA ran these memory-bound updates at a third of the copy bandwidth;
- fp16 with fp32 (fp16's exponent range cannot hold the pieces): fp32 FMA (``ieee``).

When the ``out`` tiles alone cannot fill the GPU (``r`` is one side of ``out`` and K is long), K
is cut into ``split`` slices whose partial products land in an fp32 buffer ``[split, M, N]``
summed afterwards: deterministic, unlike atomics.

A caller whose step is host-bound passes ``host_bound=True``: the product then runs as plain
PyTorch on CUDA too (the reference: fp32 copies and an fp32 cuBLAS product, the same fp32
accuracy and one rounding). A Triton launch costs the host more than a cuBLAS op, even through
:mod:`~sloth_fx.kernels.launch`'s cache, while the copies and the fp32 product cost the GPU more
than the kernel does. Which one wins is a property of the whole step, not of one product, so the
caller decides (the LoRA op, by its token count).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch import launch
from .toolkit import SUPPORTED_DTYPES, cdiv, interpreting, multi_processor_count, next_power_of_2, use_triton

__all__ = ["lowrank_mm", "lowrank_mm_reference", "runs_wide", "split_k_for", "wide_dtype"]

# How the tile product is formed (a compile-time constant of the kernel).
NATIVE, SPLIT_A, SPLIT_B, SPLIT_BOTH, FMA = 0, 1, 2, 3, 4


@triton.jit
def _bf16_pieces(t):
    """fp32 ``t`` as ``hi + mid + lo``, three bf16 tiles of 8 significant bits each: 24 bits,
    fp32's whole significand (bf16 has fp32's exponent range, so nothing under- or overflows)."""
    hi = t.to(tl.bfloat16)
    rest = t - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _lowrank_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, k_per_split,
                       stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
                       alpha, ACCUMULATE: tl.constexpr, MODE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a_mask = (rm[:, None] < M) & (rk[None, :] < k_hi)
        b_mask = (rk[:, None] < k_hi) & (rn[None, :] < N)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_mask, other=0.0)
        if MODE == 0:
            acc = tl.dot(a, b, acc)
        elif MODE == 1:
            hi, mid, lo = _bf16_pieces(a)
            acc = tl.dot(lo, b, tl.dot(mid, b, tl.dot(hi, b, acc)))
        elif MODE == 2:
            hi, mid, lo = _bf16_pieces(b)
            acc = tl.dot(a, lo, tl.dot(a, mid, tl.dot(a, hi, acc)))
        elif MODE == 3:
            a_hi, a_mid, a_lo = _bf16_pieces(a)
            b_hi, b_mid, b_lo = _bf16_pieces(b)
            # the six cross terms down to 2^-16 relative (mid·lo, lo·mid, lo·lo: 2^-24 and less)
            acc = tl.dot(a_hi, b_hi, tl.dot(a_hi, b_mid, tl.dot(a_mid, b_hi, acc)))
            acc = tl.dot(a_hi, b_lo, tl.dot(a_lo, b_hi, tl.dot(a_mid, b_mid, acc)))
        else:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    acc = acc * alpha
    c_ptrs = c_ptr + pid_s * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@lru_cache(maxsize=None)
def _mode(a: torch.dtype, b: torch.dtype, interpret: bool) -> int:
    if interpret:  # NumPy has no bf16: the interpreter gets the pieces wrong (GPU-tested)
        return NATIVE if a == b and a == torch.float16 else FMA
    if a == b and a != torch.float32:
        return NATIVE
    if (a, b) == (torch.float32, torch.bfloat16):
        return SPLIT_A
    if (a, b) == (torch.bfloat16, torch.float32):
        return SPLIT_B
    if (a, b) == (torch.float32, torch.float32):
        return SPLIT_BOTH
    return FMA


def wide_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """What the reference computes in: fp64 when an operand is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def lowrank_mm_reference(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, out: torch.Tensor | None = None,
                         accumulate: bool = False) -> torch.Tensor:
    """:func:`lowrank_mm` in plain PyTorch: the product in fp32 (fp64 if an operand is fp64).

    An accumulated product takes the fewest kernels and bytes, for the host-bound products that take
    this path on CUDA: into a wide ``out``, one in-place ``addmm`` (the sum in the product's
    epilogue); into a 16-bit ``out``, the wide product and one in-place ``add_``, which sums
    ``out + alpha·(a·b)`` in fp32 and rounds once into ``out`` (no wide copy of ``out``)."""
    wide = wide_dtype(a, b)
    a, b = a.to(wide), b.to(wide)
    if accumulate and out.dtype == wide:
        return out.addmm_(a, b, alpha=alpha)
    if accumulate:
        return out.add_(a @ b, alpha=alpha)
    result = a @ b
    if alpha != 1.0:
        result *= alpha
    return result if out is None else out.copy_(result)


def _block(size: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(size)))


@lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """Two waves of programs: enough to keep every SM busy while a slow tile finishes."""
    if device.type != "cuda":
        return 1
    return 2 * multi_processor_count(device)


class _Launch(NamedTuple):
    """Everything about a launch that depends only on the shapes: decided once per shape."""

    block_m: int
    block_n: int
    block_k: int
    grid: tuple[int, int, int]  # (tiles of M, tiles of N, slices of K)
    k_per_split: int
    num_warps: int
    num_stages: int


@lru_cache(maxsize=4096)
def _launch(m: int, n: int, k: int, fresh_fp32: bool, split_k: int | None, device: torch.device) -> _Launch:
    """The tiles, grid and K split of ``[m, k]·[k, n]``; ``fresh_fp32``: ``out`` is a new fp32
    result (not accumulated), the only case that may be split over K by default."""
    # Tile shapes measured best on the H100 at the shapes of a 7B layer (T = 16384): the in-place
    # rank-r update streams out in 64x128 tiles, K in steps of 16; a long-K product keeps its
    # thin side whole and runs 128 wide on the other.
    long_k = k > 64
    if not long_k:
        block_m, block_n, block_k = _block(m, 16, 64), _block(n, 16, 128), 16
    elif n <= 64:
        block_m, block_n, block_k = _block(m, 16, 128), _block(n, 16, 64), 64
    else:
        block_m, block_n, block_k = _block(m, 16, 64), _block(n, 16, 128), 32
    tiles_m, tiles_n = cdiv(m, block_m), cdiv(n, block_n)
    if split_k is None:
        split_k = 1
        if fresh_fp32:
            split_k = max(1, min(cdiv(_programs_wanted(device), tiles_m * tiles_n), k // (8 * block_k)))
    k_per_split = cdiv(cdiv(k, split_k), block_k) * block_k
    split_k = cdiv(k, k_per_split)
    num_warps = 8 if long_k and block_m * block_n >= 128 * 64 else 4
    return _Launch(block_m, block_n, block_k, (tiles_m, tiles_n, split_k), k_per_split, num_warps,
                   4 if long_k else 3)


def split_k_for(a: torch.Tensor, b: torch.Tensor, host_bound: bool = False) -> int:
    """How many K slices :func:`lowrank_mm` cuts ``a·b`` into for a fresh fp32 result by default
    (1 off the Triton path): the leading size of a ``partials`` buffer for that product."""
    if not _triton_path((a, b), host_bound):
        return 1
    m, k = a.shape
    return _launch(m, b.shape[1], k, True, None, a.device).grid[2] if m and b.shape[1] and k else 1


def runs_wide(a: torch.Tensor, b: torch.Tensor, host_bound: bool = False) -> bool:
    """True when ``lowrank_mm(a, b, host_bound=host_bound)`` takes the reference path, which
    copies both operands to fp32 (or fp64): a caller with one operand in several such products may
    widen it once itself."""
    return not _triton_path((a, b), host_bound)


def _triton_path(tensors: tuple[torch.Tensor, ...], host_bound: bool) -> bool:
    """The Triton kernel runs: its device and dtypes, and on CUDA a step that is not host-bound
    (under the interpreter it always runs: the tests' way to the kernel)."""
    if not use_triton(*tensors) or any(t.dtype not in SUPPORTED_DTYPES for t in tensors):
        return False
    return not (host_bound and tensors[0].is_cuda)


def _check(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lowrank_mm needs a [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"lowrank_mm needs floating-point operands, got {a.dtype} and {b.dtype}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs an out tensor to accumulate into")
        return
    if out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(f"out has shape {tuple(out.shape)}, the product {(a.shape[0], b.shape[1])}")
    if out.device != a.device or b.device != a.device:
        raise ValueError(f"operands on {a.device}, {b.device} and out on {out.device}: one device needed")


def lowrank_mm(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, out: torch.Tensor | None = None,
               accumulate: bool = False, split_k: int | None = None,
               partials: torch.Tensor | None = None, host_bound: bool = False) -> torch.Tensor:
    """``out = alpha·a·b`` (``+ out`` with ``accumulate``), fp32 accumulation, one rounding.

    ``a [M, K]`` and ``b [K, N]`` in any strides and float dtypes; ``out [M, N]`` (any strides,
    written in place and returned) or None for a new fp32 tensor. ``split_k`` fixes the number of
    K slices (default: from the shape and the GPU's SM count; never split when accumulating or
    writing a 16-bit ``out``, which must be rounded once). Triton on CUDA, the reference elsewhere.

    ``partials`` (instead of ``out``): an fp32 ``[S, M, N]`` buffer, any strides, with ``S`` the
    number of K slices (:func:`split_k_for`, or ``split_k``'s): slice ``s`` of the product is
    written to ``partials[s]`` and nothing is summed, so that several products (LoRA's siblings,
    side by side in one buffer) are summed in one pass; ``partials.sum(0)`` is then bit for bit
    the result with ``out=None``. Returned. Triton path only.

    ``host_bound``: the caller's step is host-bound; on CUDA the product runs as PyTorch ops (see
    the module doc).
    """
    _check(a, b, out, accumulate)
    tensors = (a, b) if out is None else (a, b, out)
    if partials is not None:
        if out is not None or accumulate or partials.dim() != 3 or partials.shape[1:] != (a.shape[0], b.shape[1]) \
                or partials.dtype != torch.float32 or not use_triton(a, b, partials):
            raise ValueError(f"partials must be an fp32 [S, {a.shape[0]}, {b.shape[1]}] buffer on the Triton path, "
                             "with neither out nor accumulate")
    elif not _triton_path(tensors, host_bound):
        return lowrank_mm_reference(a, b, alpha=alpha, out=out, accumulate=accumulate)
    m, k = a.shape
    n = b.shape[1]
    if out is None and partials is None:
        out = torch.empty(m, n, device=a.device, dtype=torch.float32)
    result = out if partials is None else partials
    if m == 0 or n == 0:
        return result
    if k == 0:
        return result if accumulate else result.zero_()
    fresh_fp32 = not accumulate and (partials is not None or out.dtype == torch.float32)
    tiles = _launch(m, n, k, fresh_fp32, split_k, a.device)
    splits = tiles.grid[2]
    if splits > 1 and not fresh_fp32:
        raise ValueError("split_k > 1 writes fp32 partial sums: only for a fresh fp32 out")
    if partials is not None and partials.shape[0] != splits:
        raise ValueError(f"partials has {partials.shape[0]} slices, this product is cut into {splits}")
    if partials is None and splits > 1:
        partials = torch.empty(splits, m, n, device=a.device, dtype=torch.float32)
    target = out if partials is None else partials
    stride_cs = 0 if partials is None else target.stride(0)
    launch(
        _lowrank_mm_kernel, tiles.grid,
        a, b, target, m, n, k, tiles.k_per_split, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        stride_cs, target.stride(-2), target.stride(-1), float(alpha), ACCUMULATE=accumulate,
        MODE=_mode(a.dtype, b.dtype, interpreting()), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if out is not None and partials is not None:  # split here: sum the slices into out
        torch.sum(partials, dim=0, out=out)
    return result
