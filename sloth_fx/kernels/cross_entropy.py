"""Fused lm_head + cross-entropy that never materialises the [tokens x vocab] logits.

What it replaces (Hugging Face's causal-LM loss, transformers v5 ``ForCausalLMLoss`` and
``fixed_cross_entropy``, on already shifted and flattened tokens)::

    logits = hidden @ weight.T (+ bias)            # [N, V] in the model dtype
    logits = logits * m   or   logits / d          # only with a logit scale (Cohere, Granite), model dtype
    logits = logits.float()
    logits = cap * tanh(logits / cap)              # only with a Gemma-2 style logit soft-cap
    loss   = cross_entropy(logits, labels, ignore_index, reduction="mean")        # or:
    loss   = cross_entropy(logits, labels, ignore_index, reduction="sum") / num_items_in_batch

The fused op computes it in chunks of rows (:mod:`~sloth_fx.kernels.cross_entropy_chunks`), one
Triton program a row (:mod:`~sloth_fx.kernels.cross_entropy_rows`), with the gradients formed in
the forward while each chunk's logits are at hand: at most one ``[C, V]`` logits buffer is alive.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .cross_entropy_chunks import chunk_rows, chunked_loss_and_grads
from .cross_entropy_reference import LogitScale, linear_cross_entropy_reference
from .cross_entropy_rows import scale_
from .toolkit import SUPPORTED_DTYPES, UnsupportedType, UnsupportedValue, dtype_names, refusal, use_triton

# LogitScale is the type of the op's logit_scale argument: its callers import it from here.
__all__ = [
    "LinearCrossEntropyFunction",
    "LogitScale",
    "linear_cross_entropy",
    "linear_cross_entropy_supports",
]


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
        loss, d_hidden, d_weight, d_bias = chunked_loss_and_grads(
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
    and (Triton interpreter, CPU tensors) labels outside [0, V) that are not ``ignore_index``. On
    CUDA such a label fails a device-side assert instead, which the host does not wait for: it
    surfaces later as a RuntimeError ("device-side assert triggered"), with the range, V and
    ``ignore_index`` in the message the device prints
    (:func:`~sloth_fx.kernels.cross_entropy_chunks._check_labels_in_range`).
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
    loss, _, _, _ = chunked_loss_and_grads(
        hidden, weight, bias, labels, ignore_index, num_items_in_batch, logit_softcap, logit_scale, chunk,
        need_d_hidden=False, need_d_weight=False, need_d_bias=False,
    )
    return loss
