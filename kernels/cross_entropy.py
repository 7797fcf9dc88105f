"""Fused lm_head + cross-entropy that never materialises the [tokens x vocab] logits.

What it replaces (Hugging Face's causal-LM loss, transformers v5 ``ForCausalLMLoss`` and
``fixed_cross_entropy``, on already shifted and flattened tokens)::

    logits = hidden @ weight.T (+ bias)            # [N, V] in the model dtype
    logits = logits * m   or   logits / d          # only with a logit scale (Cohere, Granite), model dtype
    logits = logits.float()
    logits = cap * tanh(logits / cap)              # only with a Gemma-2 style logit soft-cap
    loss   = cross_entropy(logits, labels, ignore_index, reduction="mean")        # or:
    loss   = cross_entropy(logits, labels, ignore_index, reduction="sum") / num_items_in_batch

How the fused op computes it: the N token rows are processed in chunks of C rows. For each chunk

1. ``logits_c = hidden_c @ weight.T (+ bias)`` in the model dtype with ``torch.mm`` / ``torch.addmm``
   (the same cuBLAS call ``F.linear`` makes, so the same rounding as HF), into one reused [C, V] buffer,
   scaled there in place by the same model-dtype operation as HF's (``* m`` or ``/ d``);
2. one Triton program per row (:mod:`~sloth_fx.kernels.cross_entropy_rows`) reads the row (upcast
   to fp32, soft-capped if asked), computes ``lse = log(sum_j exp(z_j))`` with an online max/sum
   over vocab blocks, the row's loss
   ``lse - z[label]`` (0 for an ignored label), and overwrites the row IN PLACE with the gradient of
   the loss with respect to the pre-cap logits (see :class:`LinearCrossEntropyFunction`), which
   the same scaling, applied again in the model dtype, turns into the gradient before the scale
   (what autograd computes for HF's ``* m`` and ``/ d``);
3. ``d_hidden_c = dlogits_c @ weight`` and ``d_weight += dlogits_c.T @ hidden_c``,
   ``d_bias += sum_rows(dlogits_c)`` (the last two accumulated in fp32, cast at the end).

So at most one [C, V] buffer is alive; C comes from a memory budget (:func:`chunk_rows`).

Labels outside ``[0, V)`` that are not ``ignore_index``: the reference path leaves them to
``F.cross_entropy`` (which raises on CPU and device-asserts on CUDA, as in HF). The Triton path checks
them once per call with one reduction over the labels and raises ``ValueError``; that check costs one
device-to-host synchronisation per forward (a few microseconds next to the chunk matmuls), and the
kernel also masks its label load so that an out-of-range label can never read out of bounds.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .cross_entropy_rows import rows_loss_and_grad_, scale_
from .toolkit import SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, dtype_names, refusal, use_triton

__all__ = [
    "LinearCrossEntropyFunction",
    "LogitScale",
    "chunk_rows",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_supports",
]

# Largest vocab block one program holds at a time. 4096 fp32 values over 8 warps (256 threads) are
# 16 registers per thread: enough work per load to stream at full bandwidth, small enough not to
# spill. Vocabularies larger than this (32000, 128256) are covered by the online loop. Tests lower it
# to exercise the loop on small vocabularies.
_MAX_BLOCK_V = 4096


@dataclass(frozen=True)
class LogitScale:
    """A constant the logits are multiplied (``op="mul"``, Cohere's ``logit_scale``) or divided
    (``op="div"``, Granite's ``logits_scaling``) by, in the model dtype, before the upcast.

    Multiplying by ``m`` and dividing by ``1/m`` round differently, so the op is kept as written.
    The gradient before the scale is the same op on the gradient after it: ``d(x*m) = dy*m``,
    ``d(x/d) = dy/d``.
    """

    op: Literal["mul", "div"]
    value: float

    def __call__(self, t: Tensor) -> Tensor:
        return t * self.value if self.op == "mul" else t / self.value

    def apply_(self, t: Tensor) -> Tensor:
        return t.mul_(self.value) if self.op == "mul" else t.div_(self.value)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                                   ignore_index: int = -100, num_items_in_batch: Tensor | int | None = None,
                                   logit_softcap: float | None = None, logit_scale: LogitScale | None = None) -> Tensor:
    """HF's causal-LM loss on flattened tokens, in plain PyTorch: the truth the fused op is tested against.

    ``hidden`` [N, H], ``weight`` [V, H], ``labels`` [N] int64, ``bias`` [V] or None.
    Exactly HF's computation: ``logits = F.linear(hidden, weight, bias)`` in the model dtype, scaled
    there by ``logit_scale`` if given, then ``logits.float()``, then (if ``logit_softcap``) ``cap * tanh(logits / cap)``, then
    ``F.cross_entropy(..., ignore_index, reduction="mean")``, or with ``num_items_in_batch`` given,
    ``reduction="sum"`` divided by ``num_items_in_batch``. Returns an fp32 scalar. All labels ignored
    gives nan for the mean (0/0, as HF) and 0 for the sum.
    """
    logits = F.linear(hidden, weight, bias)
    if logit_scale is not None:
        logits = logit_scale(logits)
    logits = logits.float()
    if logit_softcap is not None:
        logits = logits / logit_softcap
        logits = torch.tanh(logits)
        logits = logits * logit_softcap
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# ----------------------------------------------------------------------------------------------
# Chunk size
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Chunked forward (+ gradients)
# ----------------------------------------------------------------------------------------------


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer this module allocates goes through here (tests poison and spy on it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return _empty(shape, dtype, device).zero_()


def _grad_scale(
    n_valid: Tensor, num_items_in_batch: Tensor | int | float | None, device: torch.device
) -> Tensor:
    """The [1] fp32 factor d loss / d loss_sum: 1/n_valid (mean, n_valid over ALL rows) or 1/num_items."""
    if num_items_in_batch is None:
        return (1.0 / n_valid.to(torch.float32)).reshape(1)
    if torch.is_tensor(num_items_in_batch):
        return (1.0 / num_items_in_batch.to(device=device, dtype=torch.float32)).reshape(1)
    return torch.full((1,), 1.0 / float(num_items_in_batch), dtype=torch.float32, device=device)


def _check_labels_in_range(labels: Tensor, valid: Tensor, ignore_index: int, vocab: int) -> None:
    """``valid``: ``labels != ignore_index``."""
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):  # one device-to-host sync per call (see the module docstring)
        first = labels[bad][0].item()
        raise ValueError(
            f"linear_cross_entropy: label {first} is outside [0, {vocab}) and is not ignore_index={ignore_index}"
        )


def _chunked_loss_and_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                            num_items_in_batch: Tensor | int | float | None, logit_softcap: float | None,
                            logit_scale: LogitScale | None, chunk: int, need_d_hidden: bool, need_d_weight: bool,
                            need_d_bias: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss (fp32, HF's shape) and the requested gradients for d loss = 1, chunk rows at a time."""
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    labels = labels.contiguous()  # [N] int64, tiny: the kernel indexes it with unit stride
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
        denom = num_items_in_batch
        if torch.is_tensor(denom):
            denom = denom.to(loss_sum.device)
        loss = loss_sum / denom
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


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Fused ``cross_entropy(softcap(float(hidden @ weight.T + bias)), labels)``, chunked over rows.

    ``apply(hidden, weight, bias, labels, ignore_index, num_items_in_batch, logit_softcap, logit_scale, chunk)``.

    Forward, per token row i with pre-cap logits ``x_i = hidden_i @ weight.T + bias`` (model dtype,
    scaled there by the logit scale if any, then upcast to fp32) and ``z_i = cap * tanh(x_i / cap)`` (or ``z_i = x_i`` without a cap)::

        lse_i  = log sum_j exp(z_ij)                         (online max/sum over vocab blocks)
        loss_i = lse_i - z_i[label_i]     (0 where label_i == ignore_index)
        loss   = sum_i loss_i / n_valid           (mean; n_valid = #non-ignored labels, all rows)
               = sum_i loss_i / num_items_in_batch   (when given)

    The gradients are computed DURING forward, while each chunk's logits are at hand (this saves
    recomputing the logits in backward), for d loss = 1::

        dx_ij    = (softmax(z_i)_j - [j == label_i]) * s * (1 - tanh^2(x_ij / cap))   (no last factor
                   without a cap); s = 1/n_valid or 1/num_items_in_batch; dx_i = 0 on ignored rows;
                   rounded once to the model dtype (as HF's ``.float()`` backward does), then
                   scaled as the logits were (in the model dtype, as autograd's ``* m`` / ``/ d``)
        d_hidden = dx @ weight                          (model dtype, per chunk)
        d_weight = sum_chunks dx_c.T @ hidden_c         (fp32 accumulation, cast at the end)
        d_bias   = sum_i dx_i                           (fp32 accumulation, cast at the end)

    Saved for backward: d_hidden [N, H], d_weight [V, H], d_bias [V], each only when that input
    requires grad. Backward multiplies them by ``grad_output`` (a scalar; exact when it is 1, else
    one more rounding than HF in fp16/bf16) and returns them. Never alive: any [N, V] tensor; the
    only vocab-wide buffer is one [chunk, V] in the model dtype (plus d_weight if the head trains).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                labels: Tensor, ignore_index: int, num_items_in_batch: Tensor | int | float | None,
                logit_softcap: float | None, logit_scale: LogitScale | None, chunk: int) -> Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss, d_hidden, d_weight, d_bias = _chunked_loss_and_grads(
            hidden, weight, bias, labels, ignore_index, num_items_in_batch, logit_softcap, logit_scale, chunk,
            need_d_hidden=need_h, need_d_weight=need_w, need_d_bias=need_b and bias is not None,
        )
        ctx.has = (d_hidden is not None, d_weight is not None, d_bias is not None)
        ctx.save_for_backward(*[t for t in (d_hidden, d_weight, d_bias) if t is not None])
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if has else None for has in ctx.has]
        # loss has one element (0-dim, or [1] when num_items_in_batch is a [1] tensor).
        g = grad_output.reshape(()).to(torch.float32)
        grads = [None if t is None else scale_(t, g) for t in grads]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int,
                  num_items_in_batch: Tensor | int | float | None, logit_softcap: float | None,
                  logit_scale: LogitScale | None) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not torch.is_tensor(t):
            raise UnsupportedType("linear_cross_entropy", f"{name} must be a Tensor, got {type(t).__name__}")
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedType("linear_cross_entropy", f"hidden dtype {hidden.dtype} is not supported "
                                                       f"(one of {dtype_names(SUPPORTED_DTYPES)} is)")
    if weight.dtype != hidden.dtype:
        raise UnsupportedType("linear_cross_entropy", f"weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    if labels.dtype != torch.int64:
        raise UnsupportedType("linear_cross_entropy", f"labels must be int64, got {labels.dtype}")
    if hidden.dim() != 2:
        raise UnsupportedValue(
            "linear_cross_entropy", f"hidden must be [N, H] (flattened tokens), got {tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise UnsupportedValue(
            "linear_cross_entropy", f"weight must be [V, H] with H={hidden.shape[1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise UnsupportedValue("linear_cross_entropy", "vocab size must be >= 1")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise UnsupportedValue(
            "linear_cross_entropy", f"labels must be [N] with N={hidden.shape[0]}, got {tuple(labels.shape)}"
        )
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        if not torch.is_tensor(bias):
            raise UnsupportedType("linear_cross_entropy", f"bias must be a Tensor or None, got {type(bias).__name__}")
        if bias.dtype != hidden.dtype:
            raise UnsupportedType("linear_cross_entropy", f"bias dtype {bias.dtype} != hidden dtype {hidden.dtype}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise UnsupportedValue(
                "linear_cross_entropy", f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}"
            )
        devices.add(bias.device)
    if len(devices) != 1:
        raise UnsupportedValue("linear_cross_entropy", f"tensors on different devices: {sorted(map(str, devices))}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise UnsupportedType("linear_cross_entropy", f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            if num_items_in_batch.numel() != 1:
                raise UnsupportedValue(
                    "linear_cross_entropy", "num_items_in_batch must be a number or a one-element tensor, "
                    f"got shape {tuple(num_items_in_batch.shape)}"
                )
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, numbers.Real):
            raise UnsupportedType(
                "linear_cross_entropy", "num_items_in_batch must be an int, a 0-dim tensor or None, "
                f"got {type(num_items_in_batch).__name__}"
            )
    if logit_softcap is not None:
        if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real):
            raise UnsupportedType(
                "linear_cross_entropy", f"logit_softcap must be a float or None, got {type(logit_softcap).__name__}"
            )
        if not (math.isfinite(logit_softcap) and logit_softcap > 0):
            raise UnsupportedValue("linear_cross_entropy", f"logit_softcap must be finite and > 0, got {logit_softcap}")
    if logit_scale is not None:
        if not isinstance(logit_scale, LogitScale) or logit_scale.op not in ("mul", "div"):
            raise UnsupportedType(
                "linear_cross_entropy", f"logit_scale must be a LogitScale or None, got {logit_scale!r}"
            )
        if not math.isfinite(logit_scale.value) or (logit_scale.op == "div" and logit_scale.value == 0):
            raise UnsupportedValue(
                "linear_cross_entropy", f"logit scale {logit_scale.op} {logit_scale.value} is not finite"
            )


def linear_cross_entropy_supports(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                                  ignore_index: int = -100, num_items_in_batch: Tensor | int | None = None,
                                  logit_softcap: float | None = None,
                                  logit_scale: LogitScale | None = None) -> str | None:
    """None when :func:`linear_cross_entropy` takes these arguments, else the reason it does not.

    The checks it raises on (dtypes, shapes, devices, the loss's constants), answered instead of
    raised; they read no tensor's values, so fake tensors (an fx node's example value) do. The
    labels' range is a question of values, asked only when the op runs. ``hidden`` is
    ``[N, H]`` and ``labels`` ``[N]``: flatten the tokens first, as the op's caller does.
    """
    return refusal(_check_inputs, hidden, weight, labels, bias, ignore_index, num_items_in_batch, logit_softcap,
                   logit_scale)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, num_items_in_batch: Tensor | int | None = None,
                         logit_softcap: float | None = None, logit_scale: LogitScale | None = None,
                         memory_budget_bytes: int | None = None) -> Tensor:
    """HF's causal-LM loss of ``hidden @ weight.T (+ bias)`` on flattened, already shifted tokens.

    Same contract as :func:`linear_cross_entropy_reference` (fp32 scalar; mean over non-ignored
    labels, or sum / ``num_items_in_batch``; optional logit scale and soft-cap). On CUDA tensors (or CPU tensors
    under the Triton interpreter) runs :class:`LinearCrossEntropyFunction` in chunks of
    :func:`chunk_rows` rows (``memory_budget_bytes`` bounds the logits buffer; default: the bytes of
    ``hidden``), never materialising [N, V]; elsewhere runs the reference.

    Raises TypeError for unsupported dtypes (hidden/weight/bias fp32, fp16 or bf16, all the same;
    labels int64) and ValueError for bad shapes, mixed devices, a non-positive soft-cap or budget,
    and (Triton path) labels outside [0, V) that are not ``ignore_index``.
    """
    _check_inputs(hidden, weight, labels, bias, ignore_index, num_items_in_batch, logit_softcap, logit_scale)
    tensors = [hidden, weight, labels] + ([bias] if bias is not None else [])
    n_tokens, hidden_size = hidden.shape
    chunk = chunk_rows(n_tokens, weight.shape[0], hidden_size, hidden.dtype, memory_budget_bytes)
    if not use_triton(*tensors):
        return linear_cross_entropy_reference(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch, logit_softcap=logit_softcap, logit_scale=logit_scale,
        )
    differentiable = [hidden, weight] + ([bias] if bias is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in differentiable):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, bias, labels, ignore_index, num_items_in_batch, logit_softcap, logit_scale, chunk
        )
    # No gradient wanted: the same kernel, without its gradient pass and without the matmuls.
    loss, _, _, _ = _chunked_loss_and_grads(
        hidden, weight, bias, labels, ignore_index, num_items_in_batch, logit_softcap, logit_scale, chunk,
        need_d_hidden=False, need_d_weight=False, need_d_bias=False,
    )
    return loss
