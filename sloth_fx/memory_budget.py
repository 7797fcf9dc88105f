"""The memory budget: whether a training step offloads its checkpointed layers' inputs.

Offloading (:mod:`sloth_fx.offload`) costs two copies of every layer's input over the host link;
a batch whose activations fit never pays them. Each training step is judged on its own, from
a prediction of its activation memory against a budget:

- **predicted**: every checkpointed layer's saved input (layers x tokens x hidden x element size)
  plus the peak of the one layer being recomputed and run backward, about
  ``RECOMPUTE_HIDDEN_WIDE`` hidden-wide and ``RECOMPUTE_INTERMEDIATE_WIDE`` intermediate-wide
  activations per token;
- **offloaded**: what stays on the device then: ``KEPT_LAYERS`` layers' inputs (the last layer's,
  the one recomputing, the one prefetched) plus the same peak;
- **budget**: ``memory_budget`` bytes as given; or, with none, on CUDA what the device can still
  hand out (free memory plus what PyTorch's allocator holds unused), less a margin; on CPU with
  none, no budget: there is no device memory to save, and nothing is offloaded.

:func:`decide_offload` is the policy, a pure function of the prediction and the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sloth_fx.padding_free import call_tokens

# Chosen to come near the H100 probe of issue 15 (Llama-2-7B, bf16, one row of 65,536 tokens, 27.3
# GiB of activations, 16 of them the 32 layers' inputs): 26.7 GiB predicted. The rest is mostly the
# recomputed MLP's [T x intermediate] products; one data point cannot tell the hidden-wide share
# from the intermediate-wide one, so their split is a guess.
RECOMPUTE_HIDDEN_WIDE = 8
RECOMPUTE_INTERMEDIATE_WIDE = 5
KEPT_LAYERS = 3
# The prediction is an estimate and the allocator rounds and fragments: budget a tenth less than free.
DEVICE_SHARE = 0.9


@dataclass(frozen=True)
class ActivationEstimate:
    """A step's predicted activation memory, in bytes."""

    layers: int  # checkpointed layers
    layer_input: int  # one layer's saved input
    recompute_peak: int  # one layer while it recomputes and runs backward

    @property
    def saved_inputs(self) -> int:
        return self.layers * self.layer_input

    @property
    def total(self) -> int:
        return self.saved_inputs + self.recompute_peak

    @property
    def offloaded(self) -> int:
        return min(self.layers, KEPT_LAYERS) * self.layer_input + self.recompute_peak


@dataclass(frozen=True)
class OffloadDecision:
    offload: bool
    text: str  # the decision and the prediction, in words, for explain


def estimate_activations(layers: int, tokens: int, hidden: int, intermediate: int,
                         element_size: int) -> ActivationEstimate:
    """The activation memory of a step of ``tokens`` tokens through ``layers`` checkpointed layers."""
    per_token = RECOMPUTE_HIDDEN_WIDE * hidden + RECOMPUTE_INTERMEDIATE_WIDE * intermediate
    return ActivationEstimate(layers, tokens * hidden * element_size, tokens * per_token * element_size)


def decide_offload(estimate: ActivationEstimate, budget: int | None) -> OffloadDecision:
    """Offload when the predicted activation memory is over ``budget`` (never without one) and
    offloading would keep less on the device (not with ``KEPT_LAYERS`` layers or fewer)."""
    predicted = (f"predicted activation memory {size_text(estimate.total)} ({estimate.layers} checkpointed layer "
                 f"inputs {size_text(estimate.saved_inputs)}, recompute peak {size_text(estimate.recompute_peak)})")
    if budget is None:
        return OffloadDecision(False, f"{predicted}; no budget: no device memory to save on CPU (memory_budget sets one)")
    if estimate.total <= budget:
        return OffloadDecision(False, f"{predicted} fits in the budget of {size_text(budget)}")
    if estimate.offloaded >= estimate.total:
        return OffloadDecision(False, f"{predicted} is over the budget of {size_text(budget)}, but offloading "
                                      f"{estimate.layers} layers would keep as much on the device")
    over = ", still over the budget" if estimate.offloaded > budget else ""
    return OffloadDecision(True, f"{predicted} is over the budget of {size_text(budget)}: layer inputs offloaded to "
                                 f"host memory, about {size_text(estimate.offloaded)} kept on the device{over}")


def device_budget(device: torch.device, memory_budget: int | None) -> int | None:
    """``memory_budget`` if given; else on CUDA the memory the device can still hand out, less a
    margin; else None."""
    if memory_budget is not None:
        return memory_budget
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int((free + unused) * DEVICE_SHARE)


def plan_offload(model: nn.Module, args: tuple, kwargs: dict[str, Any], memory_budget: int | None) -> OffloadDecision:
    """This training call's decision for ``model`` (the decoder, or a HF causal LM) on its inputs."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = _checkpointed_layers(decoder) if isinstance(decoder, nn.Module) else 0
    if not layers:
        return OffloadDecision(False, "no activation checkpointing: no layer input is kept for a recompute")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None)
    tokens = call_tokens(args, kwargs)
    if not isinstance(hidden, int) or not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return OffloadDecision(False, "no prediction: the config gives no hidden_size or the call no token ids")
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    weight = model.get_input_embeddings().weight
    estimate = estimate_activations(layers, tokens.shape[0] * tokens.shape[1], hidden, intermediate, weight.element_size())
    return decide_offload(estimate, device_budget(weight.device, memory_budget))


def _checkpointed_layers(decoder: nn.Module) -> int:
    """How many decoder layers checkpoint: transformers flags each one (every n-th, with
    ``every_n_layers``), or only the decoder in models that checkpoint from its loop."""
    layers = [layer for child in decoder.children() if isinstance(child, nn.ModuleList) for layer in child]
    flagged = sum(1 for layer in layers if getattr(layer, "gradient_checkpointing", False) is True)
    return flagged or (len(layers) if getattr(decoder, "gradient_checkpointing", False) is True else 0)


def size_text(n: int) -> str:
    """Bytes as explain writes them: ``19.50 KiB``, ``4.00 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
