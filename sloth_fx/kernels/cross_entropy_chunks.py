"""The fused lm_head + cross-entropy, chunk by chunk: the loss and its gradients with at most one
``[C, V]`` logits buffer alive (:mod:`~sloth_fx.kernels.cross_entropy` holds the op, its maths and
its autograd Function).

The N token rows are processed in chunks of C rows. For each chunk

1. ``logits_c = hidden_c @ weight.T (+ bias)`` in the model dtype with ``torch.mm`` / ``torch.addmm``
   (the same cuBLAS call ``F.linear`` makes, so the same rounding as HF), into one reused [C, V] buffer,
   scaled there in place by the same model-dtype operation as HF's (``* m`` or ``/ d``);
2. one Triton program per row (:mod:`~sloth_fx.kernels.cross_entropy_rows`) reads the row (upcast
   to fp32, soft-capped if asked), computes ``lse = log(sum_j exp(z_j))`` with an online max/sum
   over vocab blocks, the row's loss ``lse - z[label]`` (0 for an ignored label), and overwrites the
   row IN PLACE with the gradient of the loss with respect to the pre-cap logits (see
   :class:`~sloth_fx.kernels.cross_entropy.LinearCrossEntropyFunction`), which
   the same scaling, applied again in the model dtype, turns into the gradient before the scale
   (what autograd computes for HF's ``* m`` and ``/ d``);
3. ``d_hidden_c = dlogits_c @ weight`` and ``d_weight += dlogits_c.T @ hidden_c``,
   ``d_bias += sum_rows(dlogits_c)`` (the last two accumulated in fp32, cast at the end).

So at most one [C, V] buffer is alive; C comes from a memory budget (:func:`chunk_rows`).

Labels outside ``[0, V)`` that are not ``ignore_index``: the reference path leaves them to
``F.cross_entropy`` (which raises on CPU and device-asserts on CUDA, as in HF). The Triton path checks
them once per call with one reduction over the labels (:func:`_check_labels_in_range`): under the
Triton interpreter (CPU tensors) it raises ``ValueError`` at once; on CUDA it is a device-side assert
that the host never waits for, since reading the answer on the host would wait for every kernel
queued before it, each step (199 ms of host wait a step at 16k tokens, measured on an H100). The row
kernel masks its label load, so an out-of-range label never reads out of bounds before the assert
fires. Nothing else in the forward or backward waits for the GPU either, a ``num_items_in_batch``
tensor on the CPU included (:func:`_num_items_on`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cross_entropy_reference import LogitScale
from .cross_entropy_rows import rows_loss_and_grad_

__all__ = ["chunk_rows", "chunked_loss_and_grads"]


# Largest vocab block one program holds at a time. 4096 fp32 values over 8 warps (256 threads) are
# 16 registers per thread: enough work per load to stream at full bandwidth, small enough not to
# spill. Vocabularies larger than this (32000, 128256) are covered by the online loop. Tests lower it
# to exercise the loop on small vocabularies.
_MAX_BLOCK_V = 4096


def chunk_rows(
    n_tokens: int, vocab: int, hidden: int, dtype: torch.dtype, memory_budget_bytes: int | None
) -> int:
    """Rows per chunk: how many [V]-wide logit rows in ``dtype`` fit the memory budget.

    The budget is ``memory_budget_bytes`` if given, else the bytes of ``hidden`` itself
    (``n_tokens * hidden * itemsize``), so that the logits buffer is never larger than the
    activations it is computed from. ``rows = budget // (vocab * itemsize)``, at least 1 (one row
    is always needed, whatever the budget) and at most ``n_tokens``. ``n_tokens == 0`` gives 1.
    """
    for name, value in (("n_tokens", n_tokens), ("vocab", vocab), ("hidden", hidden)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"chunk_rows: {name} must be an int, got {type(value).__name__}")
    if n_tokens < 0 or vocab < 1 or hidden < 1:
        raise ValueError(
            f"chunk_rows: need n_tokens >= 0, vocab >= 1, hidden >= 1; got {n_tokens}, {vocab}, {hidden}"
        )
    if memory_budget_bytes is not None:
        if not isinstance(memory_budget_bytes, int) or isinstance(memory_budget_bytes, bool):
            raise TypeError(
                f"memory_budget_bytes must be an int or None, got {type(memory_budget_bytes).__name__}"
            )
        if memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = memory_budget_bytes if memory_budget_bytes is not None else n_tokens * hidden * itemsize
    rows = budget // (vocab * itemsize)
    return max(1, min(rows, n_tokens))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer this module allocates goes through here (tests poison and spy on it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _empty(shape, dtype, device).zero_()


def _num_items_on(
    num_items_in_batch: Tensor | int | float | None, device: torch.device
) -> Tensor | int | float | None:
    """``num_items_in_batch`` with a tensor moved to ``device`` (same shape, dtype and value); a number or None as is.

    A CPU tensor's value is read on the host, where it already is, and filled into a new tensor on
    the device: ``.to(device)`` from ordinary host memory is a blocking copy, which waits for every
    kernel queued before it.
    """
    if not torch.is_tensor(num_items_in_batch) or num_items_in_batch.device == device:
        return num_items_in_batch
    if num_items_in_batch.device.type == "cpu":
        return torch.full(num_items_in_batch.shape, num_items_in_batch.item(), dtype=num_items_in_batch.dtype,
                          device=device)
    return num_items_in_batch.to(device)


def _grad_scale(
    n_valid: Tensor, num_items_in_batch: Tensor | int | float | None, device: torch.device
) -> Tensor:
    """The [1] fp32 factor d loss / d loss_sum: 1/n_valid (mean, n_valid over ALL rows) or 1/num_items
    (a tensor already on ``device``)."""
    if num_items_in_batch is None:
        return (1.0 / n_valid.to(torch.float32)).reshape(1)
    if torch.is_tensor(num_items_in_batch):
        return (1.0 / num_items_in_batch.to(torch.float32)).reshape(1)
    return torch.full((1,), 1.0 / float(num_items_in_batch), dtype=torch.float32, device=device)


def _check_labels_in_range(labels: Tensor, valid: Tensor, ignore_index: int, vocab: int) -> None:
    """Every label that is not ``ignore_index`` lies in ``[0, vocab)``; ``valid`` is ``labels != ignore_index``.

    CPU tensors (the Triton interpreter): raises ``ValueError("linear_cross_entropy: label L is
    outside [0, V) and is not ignore_index=I")`` here, L the first bad label.

    CUDA tensors: returns at once, having queued a device-side assert (``torch._assert_async``); the
    host never waits for the answer. A bad label fails the assert when the GPU reaches it, and the
    error comes later, at the next CUDA call that reports errors (a synchronisation at the latest:
    ``loss.item()``, a logging step, the optimizer's step), as torch's ``RuntimeError: CUDA error:
    device-side assert triggered``. The message, printed by the device with the failed assertion
    just before, is ``"linear_cross_entropy: a label is outside [0, V) and is not ignore_index=I"``:
    the range, the vocabulary size and ignore_index, but not the bad label's value, which only the
    GPU holds. The CUDA context is then unusable: the process must restart. ``CUDA_LAUNCH_BLOCKING=1``
    makes the error rise here, in the loss's forward.
    """
    bad = valid & ((labels < 0) | (labels >= vocab))
    if labels.is_cuda:
        torch._assert_async(
            ~bad.any(), f"linear_cross_entropy: a label is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )
        return
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"linear_cross_entropy: label {first} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )


def chunked_loss_and_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                           num_items_in_batch: Tensor | int | float | None, logit_softcap: float | None,
                           logit_scale: LogitScale | None, chunk: int, need_d_hidden: bool, need_d_weight: bool,
                           need_d_bias: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss (fp32, HF's shape) and the requested gradients for d loss = 1, ``chunk`` rows at a time.

    Inputs as checked by :func:`~sloth_fx.kernels.cross_entropy.linear_cross_entropy`; returns
    ``(loss, d_hidden, d_weight, d_bias)``, each gradient None unless asked for. A label outside
    ``[0, V)`` that is not ``ignore_index`` raises ValueError here on CPU tensors, and on CUDA fails a
    device-side assert, reported later as a RuntimeError (:func:`_check_labels_in_range`). Never waits
    for the GPU.
    """
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    labels = labels.contiguous()  # [N] int64, tiny: the kernel indexes it with unit stride
    num_items_in_batch = _num_items_on(num_items_in_batch, device)
    valid = labels != ignore_index
    _check_labels_in_range(labels, valid, ignore_index, vocab)
    compute_grad = need_d_hidden or need_d_weight or need_d_bias
    n_valid = valid.sum() if num_items_in_batch is None else None
    scale = _grad_scale(n_valid, num_items_in_batch, device)

    rows_max = min(chunk, max(n_tokens, 1))
    buf = _empty((rows_max, vocab), dtype, device)  # the only [rows, V] buffer, reused by every chunk
    loss_rows = _empty((n_tokens,), torch.float32, device)
    d_hidden = _empty((n_tokens, hidden_size), dtype, device) if need_d_hidden else None
    d_weight_acc = _zeros((vocab, hidden_size), torch.float32, device) if need_d_weight else None
    d_bias_acc = _zeros((vocab,), torch.float32, device) if need_d_bias else None
    weight_t = weight.t()

    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        h_c = hidden[start:stop]
        logits_c = buf[: stop - start]  # leading rows of a contiguous buffer: contiguous
        # Same call as F.linear on a 2-D input (mm, or addmm with the bias): same rounding as HF.
        if bias is None:
            torch.mm(h_c, weight_t, out=logits_c)
        else:
            torch.addmm(bias, h_c, weight_t, out=logits_c)
        if logit_scale is not None:
            logit_scale.apply_(logits_c)
        rows_loss_and_grad_(logits_c, labels[start:stop], loss_rows[start:stop], scale, ignore_index=ignore_index,
                            logit_softcap=logit_softcap, compute_grad=compute_grad, max_block_v=_MAX_BLOCK_V)
        dlogits_c = logits_c  # overwritten in place by the kernel
        if logit_scale is not None and compute_grad:
            logit_scale.apply_(dlogits_c)
        if need_d_hidden:
            torch.mm(dlogits_c, weight, out=d_hidden[start:stop])
        if need_d_weight:
            _accumulate_d_weight(d_weight_acc, dlogits_c, h_c)
        if need_d_bias:
            d_bias_acc.add_(dlogits_c.sum(dim=0, dtype=torch.float32))
    del buf

    loss_sum = loss_rows.sum()
    if num_items_in_batch is None:
        loss = loss_sum / n_valid  # 0/0 = nan when all are ignored, as HF
    else:
        loss = loss_sum / num_items_in_batch
    d_weight = d_weight_acc.to(dtype) if need_d_weight else None
    d_bias = d_bias_acc.to(dtype) if need_d_bias else None
    return loss, d_hidden, d_weight, d_bias


def _accumulate_d_weight(acc: Tensor, dlogits_c: Tensor, h_c: Tensor) -> None:
    """acc [V, H] fp32 += dlogits_c.T @ h_c.

    fp32 inputs accumulate straight into acc. fp16/bf16 inputs: the chunk's product is one
    model-dtype GEMM (fp32 accumulation inside, one rounding), added to the fp32 accumulator; HF
    makes one GEMM over all N rows, so the result differs from HF's by about one extra rounding of
    the model dtype when there is more than one chunk.
    """
    if dlogits_c.dtype == torch.float32:
        acc.addmm_(dlogits_c.t(), h_c)
    else:
        acc.add_(torch.mm(dlogits_c.t(), h_c))

