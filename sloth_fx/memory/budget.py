"""The memory budget: per training step, whether checkpointed layers keep their activations,
recompute them, or recompute them with their inputs offloaded to host memory.

Recompute costs a layer's forward again; offloading (:mod:`sloth_fx.memory.offload`) adds two copies of
every layer's input over the host link. A batch whose activations fit pays for neither. Each
training step is judged on its own, from a prediction of its activation memory against a budget:

- **kept** (no recompute): every checkpointed layer's activations as its backward needs them,
  about ``KEEP_HIDDEN_WIDE`` hidden-wide and ``KEEP_INTERMEDIATE_WIDE`` intermediate-wide values
  per token and layer;
- **predicted** (recompute): every checkpointed layer's saved input (layers x tokens x hidden x
  element size) plus the peak of the one layer being recomputed and run backward, about
  ``RECOMPUTE_HIDDEN_WIDE`` hidden-wide and ``RECOMPUTE_INTERMEDIATE_WIDE`` intermediate-wide
  activations per token;
- **offloaded**: what stays on the device then: ``KEPT_LAYERS`` layers' inputs (the last layer's,
  the one recomputing, the one prefetched) plus the same peak;
- **chunked**: the recompute peak when the MLPs run over chunks of ``CHUNK_TOKENS`` tokens
  (:mod:`sloth_fx.memory.token_chunks`): the intermediate-wide values of one chunk instead of the row's;
- **budget**: ``memory_budget`` bytes as given; or, with none, on CUDA what PyTorch's allocator can
  still hand out (free memory within the process's cap, plus what it holds unused), less a
  margin; on CPU with none, no budget: there is no device memory to save, and layers recompute
  as asked.

- **MoE**: a token's intermediate width is that of the ``k`` experts it is routed to (and of a
  shared expert), :func:`~sloth_fx.memory.layer_bytes.mlp_widths`; the routed experts run outside the capture, so chunking
  never bounds their part of the peak.

- **selective**: a layer recomputed with its products' outputs saved
  (:mod:`sloth_fx.memory.saved_products`) holds, beside its input, the outputs of its LoRA
  linears: the sum of their widths per token, counted from the model (``products``); in an MoE
  layer also the routed experts' grouped products, which its recompute then skips.

The step keeps all its activations when they take at most ``KEEP_SHARE`` of the budget.
Otherwise, when one layer's recompute peak is over ``CHUNK_SHARE`` of the budget, it offloads
(unchunked) if that prediction takes at most ``SAVE_SHARE`` of the budget, and else runs its MLPs
in chunks (and is then predicted chunked), recomputing or offloading. An unchunked step spends what
``SAVE_SHARE`` of the budget leaves beside the recompute's prediction on recomputing less
(:func:`_recompute_less`): first as many layers as it holds recompute selectively (a layer's
products are most of its forward's time and about half of what it keeps); when every layer does,
what is left keeps whole layers (no recompute). With no room for one layer's products, it
recomputes whole when the prediction fits the budget, and offloads above it.
:func:`decide_checkpointing` is the policy, a pure function of the prediction and the budget.
Keeping, saving products or offloading changes where values wait, never the values: the loss and
the gradients are those of plain checkpointing; chunking changes them by rounding only.

On an H100 80GB (E1: Llama-2-7B bf16, 8×2048 tokens, LoRA on the seven projections) a layer
keeps ~2.9 GiB, saves ~1.4 GiB of products, and holds 0.13 GiB as an input to recompute whole:
the default budget recomputes about 28 of the 32 layers selectively and 4 whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sloth_fx.memory import token_chunks
from sloth_fx.memory.layer_bytes import decoder_layers, mlp_widths, product_bytes_per_token
from sloth_fx.batching.padding_free import call_tokens

# The recompute peak per token. The H100 probe of issue 15 (Llama-2-7B, bf16, one row of 65,536
# tokens, 27.3 GiB of activations, 16 of them the 32 layers' inputs) gave the sum: 26.7 GiB
# predicted. Chunked runs split it (H200, allocator capped at 16 GiB, nf4, 49,152-81,920 tokens,
# the intermediate-wide part bounded by a chunk): 11 to 12 hidden-wide values per token beside
# the kept inputs and one chunk; 3.5 intermediate-wide keeps the probe's sum.
RECOMPUTE_HIDDEN_WIDE = 12
RECOMPUTE_INTERMEDIATE_WIDE = 3.5
KEPT_LAYERS = 3
# Counted on the rewritten Llama layer (bf16, LoRA on the seven projections): the bytes its
# forward saves for backward per token are 10.5 hidden-wide and 4 intermediate-wide values plus
# the adapters' fp32 x·Aᵀ (a few hundred bytes); rounded up.
KEEP_HIDDEN_WIDE = 11
KEEP_INTERMEDIATE_WIDE = 4
# Keeping is estimated more coarsely than recomputing and ragged steps fragment the allocator:
# the kept activations may take half the budget.
KEEP_SHARE = 0.5
# The prediction is an estimate and the allocator rounds and fragments: budget a tenth less than free.
DEVICE_SHARE = 0.9
# One layer's recompute peak above this share of the budget: its MLPs run in chunks. Measured on
# an H200 capped at 16 GiB (Llama-2-7B nf4, batch 1): unchunked, 16,384 tokens (a predicted peak
# of 27% of the budget) trained and 24,576 (40%) ran out of memory; chunked, 81,920 trained. At
# 16,384 tokens chunking cost 10% of the speed, so below the share it is not done. (That was with
# the MLP run three times in a chunked step, as it still is with layers checkpointed around their
# capture; a checkpoint body's recompute now skips it: token_chunks. Not yet measured so.) Above
# the share, offloading alone goes first where it fits: on an H200 capped at Unsloth's 20.36 GiB,
# E1 (8x2048, bf16, a 2.68 GiB peak of a ~6.3 GiB budget) ran out of memory chunked and
# recomputing, and trained offloaded unchunked at 12,511 tokens/s, peaking at 16.39 GiB.
CHUNK_SHARE = 1 / 3
# The share of the budget that a step with recompute may fill when it saves products or keeps
# layers: the products are counted exactly, the kept layers and the recompute peak estimated.
SAVE_SHARE = 0.8


@dataclass(frozen=True)
class ActivationEstimate:
    """A step's predicted activation memory, in bytes."""

    layers: int  # checkpointed layers
    layer_input: int  # one layer's saved input
    recompute_peak: int  # one layer while it recomputes and runs backward
    kept: int  # every checkpointed layer's activations, with no recompute
    chunked_peak: int  # the recompute peak with the MLP's intermediate-wide values one chunk at a time
    products: int = 0  # one layer's saved product outputs when it recomputes selectively

    @property
    def kept_layer(self) -> int:
        return self.kept // max(self.layers, 1)

    @property
    def saved_inputs(self) -> int:
        return self.layers * self.layer_input

    @property
    def total(self) -> int:
        return self.saved_inputs + self.recompute_peak

    @property
    def offloaded(self) -> int:
        return min(self.layers, KEPT_LAYERS) * self.layer_input + self.recompute_peak


KEEP, SELECTIVE, RECOMPUTE, OFFLOAD, NONE = "keep", "selective", "recompute", "offload", "none"


@dataclass(frozen=True)
class CheckpointDecision:
    mode: str  # KEEP, SELECTIVE, RECOMPUTE, OFFLOAD; NONE: nothing is checkpointed
    text: str  # the decision and the prediction, in words, for explain
    chunk: bool = False  # token-wise MLPs run over chunks of tokens (sloth_fx.memory.token_chunks)
    keep_first: int = 0  # the first checkpointed layers of the step run with no checkpoint
    save_products: int = 0  # the next recompute with their products' outputs saved

    @property
    def offload(self) -> bool:
        return self.mode == OFFLOAD

    @property
    def keep(self) -> bool:
        return self.mode == KEEP


def estimate_activations(layers: int, tokens: int, hidden: int, intermediate: int, element_size: int,
                         product_bytes: int = 0, routed: int = 0) -> ActivationEstimate:
    """The activation memory of a step of ``tokens`` tokens through ``layers`` checkpointed layers
    whose products' outputs take ``product_bytes`` per token and layer (:func:`~sloth_fx.memory.layer_bytes.product_bytes_per_token`).

    ``intermediate`` is the width of the dense MLPs a token passes through, which chunking bounds;
    ``routed`` that of its routed experts (top-k times an expert's width), which run outside the
    capture and are never chunked (:func:`~sloth_fx.memory.layer_bytes.mlp_widths`)."""
    def peak(intermediate_tokens: int) -> int:
        return int((RECOMPUTE_HIDDEN_WIDE * hidden * tokens + RECOMPUTE_INTERMEDIATE_WIDE
                    * (intermediate * intermediate_tokens + routed * tokens)) * element_size)

    kept_per_token = KEEP_HIDDEN_WIDE * hidden + KEEP_INTERMEDIATE_WIDE * (intermediate + routed)
    return ActivationEstimate(layers, tokens * hidden * element_size, peak(tokens),
                              layers * tokens * kept_per_token * element_size,
                              peak(min(tokens, token_chunks.CHUNK_TOKENS)), tokens * product_bytes)


def decide_checkpointing(estimate: ActivationEstimate, budget: int | None) -> CheckpointDecision:
    """Keep the activations when they take at most ``KEEP_SHARE`` of ``budget``. Where one layer's
    recompute peak is over ``CHUNK_SHARE`` of the budget and the row is longer than a chunk,
    offload unchunked when that prediction takes at most ``SAVE_SHARE`` of the budget, else run
    the MLPs in chunks of tokens (the prediction then counts the chunked peak). Then spend the
    room left on recomputing less (:func:`_recompute_less`, unchunked steps only); else recompute
    when the prediction fits ``budget``, else offload, unless offloading would keep as much on the
    device (``KEPT_LAYERS`` layers or fewer). Without a budget, recompute as asked."""
    if budget is None:
        return CheckpointDecision(RECOMPUTE, f"{_predicted(estimate)}; no budget: no device memory to save on CPU "
                                             "(memory_budget sets one)")
    if estimate.kept <= KEEP_SHARE * budget:
        return CheckpointDecision(KEEP, f"activations kept, no recompute: {size_text(estimate.kept)} for "
                                        f"{estimate.layers} layers, within half the budget of {size_text(budget)}",
                                  keep_first=estimate.layers)
    if estimate.recompute_peak <= CHUNK_SHARE * budget or estimate.chunked_peak == estimate.recompute_peak:
        # small enough, or one chunk already
        return _recompute_less(estimate, budget) or _recompute_or_offload(estimate, budget)
    if estimate.offloaded < estimate.total and estimate.offloaded <= SAVE_SHARE * budget:
        return CheckpointDecision(OFFLOAD, f"{_predicted(estimate)}: one layer's recompute peak is over a third of the "
                                           f"budget of {size_text(budget)}; layer inputs offloaded to host memory "
                                           f"instead of chunking the MLPs, about {size_text(estimate.offloaded)} kept "
                                           f"on the device, within {SAVE_SHARE:.0%} of the budget")
    return _recompute_or_offload(dataclasses.replace(estimate, recompute_peak=estimate.chunked_peak), budget,
                                 unchunked_peak=estimate.recompute_peak)


def _recompute_less(estimate: ActivationEstimate, budget: int) -> CheckpointDecision | None:
    """Spend what ``SAVE_SHARE`` of ``budget`` leaves beside the recompute's prediction: as many
    layers as it holds save their products' outputs, and once all do, what is left keeps whole
    layers. None when it holds no layer's products."""
    room = int(SAVE_SHARE * budget) - estimate.total
    if estimate.products <= 0 or room < estimate.products:
        return None
    selective = min(estimate.layers, room // estimate.products)
    kept = 0
    upgrade = estimate.kept_layer - estimate.layer_input - estimate.products  # a selective layer kept whole
    if selective == estimate.layers and upgrade > 0:
        kept = min(estimate.layers, (room - estimate.layers * estimate.products) // upgrade)
    selective -= kept
    whole = estimate.layers - kept - selective
    predicted = estimate.total + selective * estimate.products + kept * (estimate.kept_layer - estimate.layer_input)
    return CheckpointDecision(
        SELECTIVE, f"{kept} layers kept whole (about {size_text(estimate.kept_layer)} each), {selective} recompute "
                   f"keeping their products' outputs ({size_text(estimate.products)} each), {whole} recompute whole; "
                   f"{_predicted(estimate)}, with what is kept {size_text(predicted)}, within "
                   f"{SAVE_SHARE:.0%} of the budget of {size_text(budget)}",
        keep_first=kept, save_products=selective)


def _predicted(estimate: ActivationEstimate) -> str:
    return (f"predicted activation memory {size_text(estimate.total)} ({estimate.layers} checkpointed layer "
            f"inputs {size_text(estimate.saved_inputs)}, recompute peak {size_text(estimate.recompute_peak)})")


def _recompute_or_offload(estimate: ActivationEstimate, budget: int,
                          unchunked_peak: int | None = None) -> CheckpointDecision:
    """Recompute when ``estimate`` fits ``budget``, else offload where that keeps less on the device.
    With ``unchunked_peak`` the step runs its MLPs in chunks (``estimate`` counts the chunked peak)."""
    chunk = unchunked_peak is not None
    chunking = (f"; MLPs run over chunks of {token_chunks.CHUNK_TOKENS} tokens (one layer's recompute peak would be "
                f"{size_text(unchunked_peak)}, over a third of the budget)" if chunk else "")
    predicted = _predicted(estimate)
    if estimate.total <= budget:
        return CheckpointDecision(RECOMPUTE, f"{predicted} fits in the budget of {size_text(budget)}{chunking}", chunk)
    if estimate.offloaded >= estimate.total:
        return CheckpointDecision(RECOMPUTE, f"{predicted} is over the budget of {size_text(budget)}, but offloading "
                                             f"{estimate.layers} layers would keep as much on the device{chunking}",
                                  chunk)
    over = ", still over the budget" if estimate.offloaded > budget else ""
    return CheckpointDecision(OFFLOAD, f"{predicted} is over the budget of {size_text(budget)}: layer inputs offloaded "
                                       f"to host memory, about {size_text(estimate.offloaded)} kept on the device{over}"
                                       f"{chunking}", chunk)


def device_budget(device: torch.device, memory_budget: int | None) -> int | None:
    """``memory_budget`` if given; else on CUDA the memory PyTorch's allocator can still hand out,
    less a margin; else None.

    The allocator can hand out what it holds unused plus what it may still reserve: the device's
    free memory, and no more than the process's cap (``torch.cuda.set_per_process_memory_fraction``
    of the total) less what it has reserved. A process sharing its GPU under a cap is budgeted
    within the cap, not on the device's free memory."""
    if memory_budget is not None:
        return memory_budget
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    unused = reserved - torch.cuda.memory_allocated(device)
    cap = int(total * _memory_fraction(device))
    return int((min(free, max(0, cap - reserved)) + unused) * DEVICE_SHARE)


def _memory_fraction(device: torch.device) -> float:
    """The process's cap on ``device`` as a share of its memory (1.0 where torch cannot say)."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    return 1.0 if get is None else float(get(torch.cuda.current_device() if device.index is None else device.index))


def plan_checkpointing(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                       memory_budget: int | None) -> CheckpointDecision:
    """This training call's decision for ``model`` (the decoder, or a HF causal LM) on its inputs."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = _checkpointed_layers(decoder) if isinstance(decoder, nn.Module) else 0
    if not layers:
        return CheckpointDecision(NONE, "no activation checkpointing: no layer input is kept for a recompute")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None)
    tokens = call_tokens(args, kwargs)
    if not isinstance(hidden, int) or not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return CheckpointDecision(RECOMPUTE, "no prediction: the config gives no hidden_size or the call no token ids")
    dense, routed = mlp_widths(config, hidden)
    weight = model.get_input_embeddings().weight
    estimate = estimate_activations(layers, tokens.shape[0] * tokens.shape[1], hidden, dense,
                                    weight.element_size(), product_bytes_per_token(decoder, weight.element_size()),
                                    routed)
    return decide_checkpointing(estimate, device_budget(weight.device, memory_budget))


def _checkpointed_layers(decoder: nn.Module) -> int:
    """How many decoder layers checkpoint: transformers flags each one (every n-th, with
    ``every_n_layers``), or only the decoder in models that checkpoint from its loop."""
    layers = decoder_layers(decoder)
    flagged = sum(1 for layer in layers if getattr(layer, "gradient_checkpointing", False) is True)
    return flagged or (len(layers) if getattr(decoder, "gradient_checkpointing", False) is True else 0)


def size_text(n: int) -> str:
    """Bytes as explain writes them: ``19.50 KiB``, ``4.00 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
