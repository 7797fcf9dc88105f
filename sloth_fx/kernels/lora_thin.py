"""The rank-r products of a LoRA group's backward, over all its siblings at once: ``g`` and dB.

:class:`~sloth_fx.kernels.lora_function.LoRAGroupFunction`'s backward needs, per sibling ``i``,
``g_i = s_i·dY_i·B_i`` (``[T, r_i]``, for dX and dA) and ``dB_i = s_i·dY_iᵀ·xa_i``. Each is a
:func:`~sloth_fx.kernels.lowrank_mm.lowrank_mm` product; these run a group's siblings together,
with fewer launches and the same sums (see each function).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .lowrank_mm import lowrank_mm, split_k_for, wide_dtype

__all__ = ["thin_grads_wide", "thin_products"]


def thin_grads_wide(dys: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor], xa: torch.Tensor | None,
                    scales: Sequence[float], ranks: Sequence[int], need_g: bool,
                    need_b: Sequence[bool]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """``g`` and the ``dB_i`` of a group whose thin products all take ``lowrank_mm``'s reference
    path (host-bound steps on CUDA; CPU): every sibling in one wide product each, so that a step of
    many small calls launches a few products instead of two per sibling::

        dY = [dY_1 … dY_n]  (widened once)      B = blockdiag(B_1, …, B_n)
        g  = dY·B  -> [dY_1·B_1 … dY_n·B_n]      dYᵀ·xa -> block (i, i) is dY_iᵀ·xa_i

    then ``s_i`` applied to each block: the terms of the products one by one (the other blocks
    add exact zeros or are not read), summed in fp32 (fp64 for fp64 operands), rounded once.
    """
    wide = wide_dtype(dys[0], lora_bs[0])  # xa is fp64 only when x or the adapters are
    dy = (dys[0] if len(dys) == 1 else torch.cat(dys, dim=1)).to(wide)
    cols = [sum(ranks[:i]) for i in range(len(ranks) + 1)]
    rows = [sum(d.shape[1] for d in dys[:i]) for i in range(len(dys) + 1)]
    g = None
    if need_g:
        b = lora_bs[0] if len(lora_bs) == 1 else torch.block_diag(*lora_bs)
        g = dy @ b.to(wide)
        for i, s in enumerate(scales):
            if s != 1.0:
                g[:, cols[i]:cols[i + 1]] *= s
    d_b: list[torch.Tensor | None] = [None] * len(dys)
    if any(need_b):
        every = dy.t() @ xa.to(wide)
        for i, s in enumerate(scales):
            if need_b[i]:
                block = every[rows[i]:rows[i + 1], cols[i]:cols[i + 1]]
                d_b[i] = (block * s if s != 1.0 else block).to(lora_bs[i].dtype)
    return g, d_b


def thin_products(products: Sequence[tuple[torch.Tensor, torch.Tensor, float]], dim: int, host_bound: bool,
                  out: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``alpha_i·a_i·b_i`` for each product: into consecutive slices of the fp32 ``out`` along
    ``dim`` (0: rows, 1: columns), or without ``out`` as fresh results; returned.

    When the products are cut into the same number of K slices (and, without ``out``, stack as
    rows of equal width), their partial sums share one buffer and are summed in one pass instead
    of one pass each: the same additions in the same order (``lowrank_mm``'s ``partials``), fewer
    launches. The fresh results are then rows of one tensor.
    """
    splits = {split_k_for(a, b, host_bound=host_bound) for a, b, _ in products}
    split = splits.pop() if len(splits) == 1 else 1
    if out is None and split > 1 and dim == 0 and len({b.shape[1] for _, b, _ in products}) == 1:
        a0, b0, _ = products[0]
        out = torch.empty(sum(a.shape[0] for a, _, _ in products), b0.shape[1], device=a0.device, dtype=torch.float32)
    if out is None:
        return [lowrank_mm(a, b, alpha=alpha, host_bound=host_bound) for a, b, alpha in products]
    sizes = [a.shape[0] if dim == 0 else b.shape[1] for a, b, _ in products]
    parts = out.split(sizes, dim=dim)
    if split > 1:
        partials = torch.empty(split, *out.shape, device=out.device, dtype=torch.float32)
        for (a, b, alpha), part in zip(products, partials.split(sizes, dim=dim + 1)):
            lowrank_mm(a, b, alpha=alpha, partials=part, host_bound=host_bound)
        torch.sum(partials, dim=0, out=out)
    else:
        for (a, b, alpha), part in zip(products, parts):
            lowrank_mm(a, b, alpha=alpha, out=part, host_bound=host_bound)
    return list(parts)
