"""Grouped products of a routed-experts layer: the LoRA parts, all experts in one launch, and the base.

The rows ``[S, ·]`` of every operand here are slots (a token's copy for one of its top-k experts)
sorted by expert: expert ``e`` owns rows ``offsets[e-1] .. offsets[e]`` (``offsets``: int32 ``[E]``,
the running count of rows per expert, ``offsets[-1] = S``; an expert with no rows has an empty
segment). Each product is the same product for every expert, on that expert's rows and factors:

- :func:`grouped_lowrank_mm`: ``out_e = alpha·x_e·w_eᵀ`` (``+ out_e`` with ``accumulate``), ``w``
  ``[E, N, K]`` in any strides. LoRA's ``U = x·Aᵀ`` (``w = A``, a new fp32 ``[S, r]``) and its
  epilogue ``Y += s·U·Bᵀ`` (``w = B``, in place on the base product's output), and in the backward
  ``dY·B`` and ``+= s·V·A`` (``w`` = the transposed views of ``B`` and ``A``).
- :func:`grouped_lowrank_grad`: ``out[e] = alpha·p_eᵀ·q_e``, a reduction over the expert's rows:
  ``dA_e = s·V_eᵀ·X_e`` and ``dB_e = s·dY_eᵀ·U_e``. ``out [E, P, Q]`` in any strides and dtype
  (a PEFT ``lora_B`` view's strides, say); an expert with no rows gets zeros.
- :func:`grouped_base_mm`: ``x_e·b_e`` with the stacked weights, through torch's grouped GEMM
  where it takes the operands, else a loop over experts.
- :func:`grouped_weight_grad`: ``p_eᵀ·q_e`` per expert, the stacked weights' gradient where they
  train (no LoRA: a full finetune), through torch's grouped GEMM where it takes the operands, else
  :func:`grouped_lowrank_grad`.

Kernels: :func:`grouped_lowrank_mm` runs one program per ``[BLOCK_M, BLOCK_N]`` tile of one expert's
rows. The grid has ``cdiv(S, BLOCK_M) + E`` row tiles (an upper bound on the sum over experts of
``cdiv(rows_e, BLOCK_M)``, known without reading ``offsets`` on the host); each program finds its
expert and first row from ``offsets`` (a prefix sum over the experts' tile counts, in registers),
and the programs past the last tile return at once. :func:`grouped_lowrank_grad` runs one program
per expert and ``[BLOCK_P, BLOCK_Q]`` tile of ``out``, looping over the expert's rows: an expert
that takes most tokens takes most of the time (no split over rows). Accumulation in fp32, one
rounding into ``out``. Two operands of one 16-bit dtype go to the tensor cores as they are. Any
fp32 operand (PEFT keeps LoRA's factors fp32; ``U`` is fp32) makes the tile product ``tf32x3``:
each operand split into a TF32 head and a TF32 remainder, ``a·b ≈ aₕ·bₕ + aₕ·bₗ + aₗ·bₕ`` on the
tensor cores (a 16-bit operand's remainder is zero: it fits TF32 exactly), which keeps fp32's
accuracy to within about 2⁻²² relative per product (a GPU test holds M1's widths to 1e-6 of float64).
fp32 FMA (``ieee``) was the alternative: on the H100 it made these products 29% of M1's step,
and ``tf32x3`` ran the step 15% faster (24.9k to 28.7k tokens/s, an A/B in one process,
2026-12-07). ``FP32_DOT`` holds the choice, read at each launch. The dense LoRA products
(:mod:`~sloth_fx.kernels.lowrank_mm`) cut an fp32 tile into three bf16 pieces instead (exact
products, fp32's own accuracy, measured faster there than ``tf32x3``); these kernels do not share
that cut yet: it runs only on a GPU (the interpreter has no bf16), and none was left to test it.

Triton on CUDA (and on CPU under the interpreter); elsewhere, and for float64, the references
(a loop over experts in fp32, fp64 with an fp64 operand, that reads ``offsets`` on the host).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from .launch import launch
from .toolkit import SUPPORTED_DTYPES, cdiv, interpreting, next_power_of_2, use_triton

__all__ = ["grouped_base_mm", "grouped_lowrank_grad", "grouped_lowrank_grad_reference", "grouped_lowrank_mm",
           "grouped_lowrank_mm_reference", "grouped_weight_grad"]

FP32_DOT = "tf32x3"  # how a tile product with an fp32 operand runs (module doc); "ieee": fp32 FMA
_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@triton.jit
def _tile_rows(tile, offs_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert, first row and end row of row tile ``tile`` when each expert's rows are cut into
    ``BLOCK_M`` tiles in expert order; expert ``E`` for a tile past the last one."""
    idx = tl.arange(0, BLOCK_E)
    valid = idx < E
    end = tl.load(offs_ptr + idx, mask=valid, other=0)
    start = tl.load(offs_ptr + idx - 1, mask=valid & (idx > 0), other=0)
    tiles = tl.where(valid, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
    last = tl.cumsum(tiles, 0)  # one past each expert's last tile
    expert = tl.sum((last <= tile).to(tl.int32), 0)
    mine = idx == expert
    first_tile = tl.sum(tl.where(mine, last - tiles, 0), 0)
    row0 = tl.sum(tl.where(mine, start, 0), 0) + (tile - first_tile) * BLOCK_M
    return expert, row0, tl.sum(tl.where(mine, end, 0), 0)


@triton.jit
def _dot(a, b, acc, NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    if NATIVE:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit  # no argument is the slot count: a step's token count never recompiles it (kernels.toolkit)
def _grouped_mm_kernel(x_ptr, w_ptr, out_ptr, offs_ptr, E, N, K,
                       stride_xs, stride_xk, stride_we, stride_wn, stride_wk, stride_os, stride_on,
                       alpha, ACCUMULATE: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    """out[rows of e, n-tile] (+)= alpha · x[rows, :] · w[e]ᵀ for this program's row tile."""
    expert, row0, row_end = _tile_rows(tl.program_id(0), offs_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < row_end
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xs + rk[None, :] * stride_xk,
                    mask=row_mask[:, None] & (rk[None, :] < K), other=0.0)
        w = tl.load(w_base + rk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = _dot(x, w, acc, NATIVE, PRECISION)
    acc = acc * alpha
    out_ptrs = out_ptr + rows[:, None] * stride_os + rn[None, :] * stride_on
    mask = row_mask[:, None] & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_grad_kernel(p_ptr, q_ptr, q_rows_ptr, out_ptr, offs_ptr, P, Q,
                         stride_ps, stride_pp, stride_qs, stride_qq, stride_oe, stride_op, stride_oq,
                         alpha, GATHER_Q: tl.constexpr, NATIVE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e, p-tile, q-tile] = alpha · Σ over e's rows s of p[s, p-tile]ᵀ q[s', q-tile], where
    s' = q_rows[s] with GATHER_Q, else s."""
    expert = tl.program_id(0)
    row_lo = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    row_hi = tl.load(offs_ptr + expert)
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for k0 in range(row_lo, row_hi, BLOCK_K):
        rows = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        row_mask = rows < row_hi
        pt = tl.load(p_ptr + rows[None, :] * stride_ps + rp[:, None] * stride_pp,
                     mask=row_mask[None, :] & (rp[:, None] < P), other=0.0)
        q_row = tl.load(q_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64) if GATHER_Q else rows
        q = tl.load(q_ptr + q_row[:, None] * stride_qs + rq[None, :] * stride_qq,
                    mask=row_mask[:, None] & (rq[None, :] < Q), other=0.0)
        acc = _dot(pt, q, acc, NATIVE, PRECISION)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + rp[:, None] * stride_op + rq[None, :] * stride_oq
    tl.store(out_ptrs, (acc * alpha).to(out_ptr.dtype.element_ty), mask=(rp[:, None] < P) & (rq[None, :] < Q))


def _native(a: torch.dtype, b: torch.dtype) -> bool:
    """Tensor-core products as they are: one 16-bit dtype (the interpreter's NumPy has no bf16)."""
    return a == b and a in (torch.float16, torch.bfloat16) and not (interpreting() and a == torch.bfloat16)


def _block(size: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_power_of_2(size)))


@lru_cache(maxsize=4096)
def _mm_blocks(n: int, k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of ``[rows, k]·[k, n]``: a short K (the rank) streams
    ``out`` in wide tiles; a long K (the hidden size) keeps the thin side (the rank) whole."""
    if k <= 64:
        return 64, _block(n, 16, 128), _block(k, 16, 64), 4
    return 64, _block(n, 16, 64), 64, 4 if n <= 32 else 8


@lru_cache(maxsize=4096)
def _grad_blocks(p: int, q: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_Q, BLOCK_K, num_warps) of ``[p, rows]·[rows, q]``: one side is the rank."""
    return _block(p, 16, 128), _block(q, 16, 128), 32, 8 if min(p, q) > 32 else 4


def _triton_path(*tensors: torch.Tensor) -> bool:
    return use_triton(*tensors) and all(t.dtype in SUPPORTED_DTYPES for t in tensors)


def _wide(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_groups(offsets: torch.Tensor, experts: int) -> None:
    """One segment end per expert: a longer ``offsets`` would make empty groups past the last
    expert, each a launch or a host read in the loops."""
    if offsets.dim() != 1 or offsets.shape[0] != experts:
        raise ValueError(f"offsets {tuple(offsets.shape)} must hold one segment end for each of the {experts} experts")


def _bounds(offsets: torch.Tensor) -> list[int]:
    return [0, *offsets.tolist()]  # a host read: the references only


def grouped_lowrank_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                                 *, alpha: float = 1.0, accumulate: bool = False) -> torch.Tensor:
    """:func:`grouped_lowrank_mm` as a loop over experts, in fp32 (fp64 with an fp64 operand)."""
    wide = _wide(x, w, out)
    bounds = _bounds(offsets)
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        product = alpha * (x[lo:hi].to(wide) @ w[e].to(wide).T)
        out[lo:hi] = product + out[lo:hi].to(wide) if accumulate else product
    return out


def grouped_lowrank_grad_reference(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                                   *, alpha: float = 1.0, q_rows: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`grouped_lowrank_grad` as a loop over experts, in fp32 (fp64 with an fp64 operand)."""
    wide = _wide(p, q, out)
    q = q if q_rows is None else q.index_select(0, q_rows)
    bounds = _bounds(offsets)
    for e in range(out.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        out[e] = alpha * (p[lo:hi].to(wide).T @ q[lo:hi].to(wide))
    return out


def grouped_lowrank_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor | None = None,
                       *, alpha: float = 1.0, accumulate: bool = False) -> torch.Tensor:
    """``out_e = alpha·x_e·w_eᵀ`` for each expert ``e``'s rows (``+ out_e`` with ``accumulate``).

    ``x [S, K]``, ``w [E, N, K]`` and ``out [S, N]`` in any strides; ``out`` None: a new fp32
    tensor (fp64 with an fp64 operand). ``offsets``: int32 ``[E]``, see the module doc. Returns ``out``.
    """
    _check_groups(offsets, w.shape[0])
    if out is None:
        out = torch.empty(x.shape[0], w.shape[1], device=x.device, dtype=_wide(x, w))
    if not _triton_path(x, w, out):
        return grouped_lowrank_mm_reference(x, w, offsets, out, alpha=alpha, accumulate=accumulate)
    (s, k), (e, n) = x.shape, w.shape[:2]
    if s == 0 or n == 0:
        return out
    block_m, block_n, block_k, warps = _mm_blocks(n, k)
    launch(_grouped_mm_kernel, (cdiv(s, block_m) + e, cdiv(n, block_n)), x, w, out, offsets, e, n, k,
           x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
           float(alpha), ACCUMULATE=accumulate, NATIVE=_native(x.dtype, w.dtype), PRECISION=FP32_DOT, BLOCK_M=block_m,
           BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_E=next_power_of_2(e), num_warps=warps)
    return out


def grouped_lowrank_grad(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                         *, alpha: float = 1.0, q_rows: torch.Tensor | None = None) -> torch.Tensor:
    """``out[e] = alpha·p_eᵀ·q_e`` over each expert ``e``'s rows (zeros for an expert with none).

    ``p [S, P]`` and ``out [E, P, Q]`` in any strides; ``out`` is written whole and returned.
    ``q [S, Q]`` in any strides, or with ``q_rows`` (integer ``[S]``) any ``[R, Q]`` whose row
    ``q_rows[s]`` stands for slot ``s``: the gather is read in the kernel, never materialised (the
    experts' ``dA1 = s·V1ᵀ·x`` reads hidden's rows). ``offsets``: int32 ``[E]``, see the module doc.
    """
    _check_groups(offsets, out.shape[0])
    if q_rows is not None and q_rows.shape != p.shape[:1]:
        raise ValueError(f"q_rows {tuple(q_rows.shape)} must name one row of q for each of p's {p.shape[0]} rows")
    if not _triton_path(p, q, out):
        return grouped_lowrank_grad_reference(p, q, offsets, out, alpha=alpha, q_rows=q_rows)
    e, pn, qn = out.shape
    if e == 0 or pn == 0 or qn == 0:
        return out
    block_p, block_q, block_k, warps = _grad_blocks(pn, qn)
    launch(_grouped_grad_kernel, (e, cdiv(pn, block_p), cdiv(qn, block_q)), p, q,
           q if q_rows is None else q_rows, out, offsets, pn, qn,  # q: an unused pointer
           p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), out.stride(2),
           float(alpha), GATHER_Q=q_rows is not None, NATIVE=_native(p.dtype, q.dtype), PRECISION=FP32_DOT,
           BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=warps)
    return out


def _torch_grouped(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """torch's grouped GEMM of ``a`` and ``b`` where it runs (16-bit on CUDA, on CPU too where
    torch has it), else None."""
    if _GROUPED_MM is not None and (a.dtype in (torch.float16, torch.bfloat16) or not a.is_cuda):
        try:
            return _GROUPED_MM(a, b, offs=offsets)
        except (RuntimeError, NotImplementedError):  # this torch's kernel refuses the dtype or strides
            pass
    return None


def grouped_weight_grad(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[E, P, Q]`` in ``dtype``: ``p_eᵀ·q_e`` over each expert ``e``'s rows of ``p [S, P]`` and
    ``q [S, Q]`` (zeros for an expert with none), ``E = len(offsets)``."""
    out = _torch_grouped(p.t(), q, offsets)
    if out is not None:
        return out.to(dtype)
    out = torch.empty(offsets.shape[0], p.shape[1], q.shape[1], device=p.device, dtype=dtype)
    return grouped_lowrank_grad(p, q, offsets, out)


def grouped_base_mm(x: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x_e·b_e`` for each expert's rows of ``x [S, K]``; ``b [E, K, N]``; ``[S, N]`` in x's dtype.

    torch's grouped GEMM, one launch, where it runs: 16-bit on CUDA, on CPU too where torch has it;
    else (fp32 or float64 on CUDA, a dtype or layout it refuses) a loop over experts, which reads
    ``offsets`` on the host."""
    _check_groups(offsets, b.shape[0])
    out = _torch_grouped(x, b, offsets)
    if out is not None:
        return out
    out = x.new_empty(x.shape[0], b.shape[2])
    bounds = [0, *offsets.tolist()]
    for e in range(b.shape[0]):
        torch.mm(x[bounds[e]:bounds[e + 1]], b[e], out=out[bounds[e]:bounds[e + 1]])
    return out
