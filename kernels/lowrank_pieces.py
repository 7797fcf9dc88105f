"""LoRA's small thin products on cuBLAS's bf16 tensor cores, at fp32 accuracy: fp32 as bf16 pieces.

``pieces_mm(a, b, alpha, out, accumulate)`` computes what :func:`~sloth_fx.kernels.lowrank_mm.lowrank_mm`
does (``alpha·a·b``, ``+ out`` with ``accumulate``, fp32 sums, one rounding into ``out``) for the
small products that do not go to its Triton kernel, when the operands are bf16 and fp32 (a bf16
model with PEFT's fp32 adapters). The plain reference widens the bf16 operand to fp32 first: a
copy of ``x`` or ``dY`` ([T, in] or [T, out]) per product, an fp32 product on the FMA units, and
an fp32 ``[T, out]`` temporary for every in-place update. Here nothing of size T is widened.

Pieces. An fp32 ``t`` is cut into three bf16 tensors ``t = hi + mid + lo`` exactly: ``hi`` is ``t``
truncated to bf16 (the upper 16 bits of each fp32 word, a view), ``mid`` the truncation of
``t - hi`` (exact in fp32), ``lo = t - hi - mid`` (exact, and at most 8 significant bits are left,
which bf16 holds). Each piece is at most ``2⁻⁸`` of the one before. A product of two bf16 values
is exact in fp32, and cuBLAS sums them in fp32, so:

    bf16 a · fp32 b:   a·b = a·b_hi + a·b_mid + a·b_lo         one GEMM [a a a]·[b_hi; b_mid; b_lo] (K' = 3K);
                       or, where K is the long side (repeating a would copy it), [b_hi b_mid b_lo]
                       side by side (3N columns) and the thirds summed after; fp32 a likewise
    fp32 a · fp32 b:   a·b ≈ Σ a_i·b_j over i + j ≤ 2           the six pieces' products down to 2⁻¹⁶
                       (hi·hi, mid·hi, lo·hi, hi·mid, mid·mid, hi·lo; the dropped three are below
                       2⁻²⁴ of |a|·|b|), one GEMM with K' = 6K, straight into a 16-bit ``out``:
                       ``out + alpha·a·b`` is summed in fp32 in the GEMM's epilogue, rounded once

Which products come here (:func:`takes_pieces`): CUDA, operands bf16 and fp32, at least one of
them bf16 or a bf16 ``out`` to accumulate into (the in-place ``y += s·xa·Bᵀ`` and ``dX += g·A``).
Two fp32 operands into an fp32 result, fp16 anywhere and every CPU product stay on the
reference, which is exact for them without copies of size T or cannot hold the pieces (fp16's
exponent range). The arithmetic of the pieces runs on any device (the CPU tests check it): only
the bf16 GEMM with an fp32 result, ``torch.mm(..., out_dtype=float32)``, is CUDA's own.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["bf16_pieces", "pieces_mm", "takes_pieces"]

_LITTLE_ENDIAN = sys.byteorder == "little"  # the truncation below views a word's high half
_FP32_OUT_MM = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (torch >= 2.8)


def takes_pieces(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> bool:
    """Whether :func:`pieces_mm` computes this small product (module doc: CUDA, bf16 and fp32)."""
    if not (a.is_cuda and _LITTLE_ENDIAN and _FP32_OUT_MM):
        return False
    dtypes = {a.dtype, b.dtype}
    if not dtypes <= {torch.bfloat16, torch.float32}:
        return False
    if torch.bfloat16 in dtypes:
        return out is None or out.dtype in (torch.bfloat16, torch.float32)
    return accumulate and out is not None and out.dtype == torch.bfloat16


def _upper_half(t: torch.Tensor) -> torch.Tensor:
    """fp32 ``t`` (unit last stride) truncated to bf16: the high 16 bits of each word, as a view."""
    return t.view(torch.bfloat16)[..., 1::2]


def bf16_pieces(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hi, mid, lo)``, bf16 tensors of ``t``'s shape with ``hi + mid + lo == t`` exactly (module doc).
    ``t`` is a 2-D fp32 tensor in any strides; the pieces may be strided views."""
    if t.stride(-1) != 1:
        return tuple(p.t() for p in bf16_pieces(t.t())) if t.stride(0) == 1 else bf16_pieces(t.contiguous())
    hi = _upper_half(t)
    rest = t - hi
    mid = _upper_half(rest)
    return hi, mid, _upper_half(rest - mid)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 ``a·b`` summed in fp32, returned in fp32 (on CPU through fp32 copies: the same values)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _addmm_rounded_once_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``out += alpha·a·b`` for a bf16 ``out`` and bf16 operands, in fp32 and rounded once."""
    if out.is_cuda:
        return out.addmm_(a, b, alpha=alpha)
    return out.copy_(torch.addmm(out.float(), a.float(), b.float(), alpha=alpha))


def _along_k(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``(a', b')`` whose product is ``a·b`` (module doc), the pieces side by side along K: an
    fp32 operand's three pieces against the bf16 operand three times, or two fp32 operands' six
    largest cross terms."""
    if a.dtype == b.dtype == torch.bfloat16:
        return a, b
    if a.dtype == b.dtype:
        a_hi, a_mid, a_lo = bf16_pieces(a)
        b_hi, b_mid, b_lo = bf16_pieces(b)
        return (torch.cat((a_hi, a_mid, a_lo, a_hi, a_mid, a_hi), dim=1),
                torch.cat((b_hi, b_hi, b_hi, b_mid, b_mid, b_lo), dim=0))
    if a.dtype == torch.float32:
        return torch.cat(bf16_pieces(a), dim=1), torch.cat((b, b, b), dim=0)
    return torch.cat((a, a, a), dim=1), torch.cat(bf16_pieces(b), dim=0)


def _side_by_side(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a·b`` for one fp32 operand whose pieces lie along M (or N): three products in one
    GEMM, summed after. For a long K, where repeating the bf16 operand would copy it."""
    m, n = a.shape[0], b.shape[1]
    if b.dtype == torch.float32:
        return _mm_fp32(a, torch.cat(bf16_pieces(b), dim=1)).view(m, 3, n).sum(1)
    return _mm_fp32(torch.cat(bf16_pieces(a), dim=0), b).view(3, m, n).sum(0)


def pieces_mm(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, out: torch.Tensor | None = None,
              accumulate: bool = False) -> torch.Tensor:
    """``lowrank_mm``'s contract (``out = alpha·a·b``, or ``+=`` with ``accumulate``; a new fp32
    tensor without ``out``) for the products :func:`takes_pieces` accepts; arguments are checked
    by ``lowrank_mm``. The pieces go along K (one GEMM, an accumulated bf16 ``out`` updated in its
    epilogue) unless K is the long side of an fp32 operand: then along that operand's other side."""
    one_fp32 = a.dtype != b.dtype
    long_k = one_fp32 and a.shape[1] > (a.shape[0] if a.dtype == torch.float32 else b.shape[1])
    if long_k:
        result = _side_by_side(a, b)
    else:
        a2, b2 = _along_k(a, b)
        if accumulate and out.dtype == torch.bfloat16:
            return _addmm_rounded_once_(out, a2, b2, alpha)
        result = _mm_fp32(a2, b2)
    if accumulate:
        return out.add_(result, alpha=alpha)
    if alpha != 1.0:
        result *= alpha
    return result if out is None else out.copy_(result)
