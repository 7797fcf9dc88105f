"""HF's causal-LM loss on flattened tokens, as HF computes it: the truth the fused
:func:`~sloth_fx.kernels.cross_entropy.linear_cross_entropy` is tested against, and the logit scale
(Cohere, Granite) that both apply in the model dtype before the upcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LogitScale", "linear_cross_entropy_reference"]


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
