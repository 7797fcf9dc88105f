"""The head region's gate: where a training call is prepared before Dynamo sees it, and the
decoder call that the head's graph treats as opaque (its layers are regions of their own)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sloth_fx.capture.regions import RegionGate, RegionRuntime, mark_batch_and_sequence_dynamic
from sloth_fx.memory.checkpoint import checkpoint_step
from sloth_fx.memory.layer_checkpoint import own_checkpoints
from sloth_fx.memory.budget import NONE, SELECTIVE, plan_checkpointing, size_text
from sloth_fx.memory.layer_bytes import decoder_layers
from sloth_fx.memory.offload import offloading
from sloth_fx.batching.padding_free import BOUNDARIES, call_tokens, plan
from sloth_fx.report import Report
from sloth_fx.memory.token_chunks import chunking


class HeadGate(RegionGate):
    """The causal-LM module's gate, where a training call is prepared before Dynamo sees it:

    - labels are checked (shape and dtype), so that bad ones raise a clear error, not a fake-tensor one;
    - no KV cache unless the call asks for one (``use_cache=False``): training never reads it, and
      each layer's guard on its own cache entry would capture every layer apart;
    - with ``padding_free``, a padded batch runs as one packed row (:mod:`sloth_fx.batching.padding_free`).
    """

    def __init__(self, module: nn.Module, path: str, runtime: RegionRuntime, padding_free: bool,
                 hub_forward: Any = None, decoder: nn.Module | None = None) -> None:
        super().__init__(module, path, runtime, hub_forward, apart=decoder)
        self.padding_free = padding_free
        self.takes_use_cache = "use_cache" in inspect.signature(self.eager).parameters

    def run(self, args: tuple, kwargs: dict) -> Any:
        _check_labels(args, kwargs)
        if self.takes_use_cache and "use_cache" not in kwargs:
            kwargs = self.without_cache(kwargs)
        if not self.padding_free:
            return super().run(args, kwargs)
        packed = plan(kwargs) if not args else "input passed positionally"
        if isinstance(packed, str):
            self.runtime.owner.padding_free_decision(False, packed)
            return super().run(args, kwargs)
        self.runtime.owner.padding_free_decision(True, packed.note)
        return packed.restore(super().run((), packed.kwargs))

    def without_cache(self, kwargs: dict) -> dict:
        """``kwargs`` with ``use_cache=False``, computing what HF's run computes. Where HF would
        build a cache (``config.use_cache``, no checkpointing), it reads no sequence boundaries
        from ``position_ids`` (its packed-row detection needs no cache), and its sdpa, which
        packed attention stands in for, never reads a collator's ``cu_seq_lens``: a mask with
        nothing masked and no boundaries keep the row one causal sequence, as it was."""
        out = {**kwargs, "use_cache": False}
        decoder = self.module.get_decoder() if hasattr(self.module, "get_decoder") else None
        caches = getattr(self.module.config, "use_cache", False) and not getattr(decoder, "gradient_checkpointing", False)
        if not caches:
            return out
        if self.padding_free:
            out = {k: v for k, v in out.items() if k not in BOUNDARIES}
        tokens = call_tokens((), kwargs)
        if kwargs.get("position_ids") is not None and kwargs.get("attention_mask") is None \
                and isinstance(tokens, torch.Tensor):
            out["attention_mask"] = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return out


def _check_labels(args: tuple, kwargs: dict) -> None:
    labels = kwargs.get("labels")
    if labels is None:
        return
    tokens = call_tokens(args, kwargs)
    expected = None
    if isinstance(tokens, torch.Tensor):  # token ids, or embeddings with a hidden axis last
        expected = tuple(tokens.shape[:-1] if tokens.is_floating_point() else tokens.shape)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be a tensor of integer token ids, got {_describe(labels)}")
    if expected is not None and tuple(labels.shape) != expected:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the inputs have {expected}: a causal LM "
                         "takes one label per input token (-100 where nothing is predicted)")


def _describe(value: Any) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__


class OpaqueDecoder:
    """Installed as the decoder's ``forward``: Dynamo treats the call as opaque (its layers are
    regions of their own) and the head's graph after it sees dynamic batch and sequence sizes.

    Every training call reaches the layers through here, the head's own or a trainer's that calls
    the backbone itself (TRL's fused head), so this is where a step decides whether its
    checkpointed layers' inputs wait in host memory: when its predicted activation memory is over
    ``memory_budget`` (:mod:`sloth_fx.memory.budget`, :mod:`sloth_fx.memory.offload`).
    """

    def __init__(self, decoder: nn.Module, owner: Report, memory_budget: int | None) -> None:
        self.decoder = decoder
        self.owner = owner
        self.memory_budget = memory_budget

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(type(self.decoder).forward.__get__(self.decoder))

    @torch._dynamo.disable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.within_budget(args, kwargs):
            out = type(self.decoder).forward(self.decoder, *args, **kwargs)
        mark_batch_and_sequence_dynamic(tuple(out.values()) if hasattr(out, "values") else (out,), {})
        return out

    @contextlib.contextmanager
    def within_budget(self, args: tuple, kwargs: dict) -> Iterator[None]:
        """A training call's checkpointing decision, and once its forward has run, what it kept or
        moved: both recorded for explain (a decision that no layer followed says so). Nothing
        outside training."""
        if not (self.decoder.training and torch.is_grad_enabled()):
            yield
            return
        decision = plan_checkpointing(self.decoder, args, kwargs, self.memory_budget)
        own_checkpoints(layer for layer in decoder_layers(self.decoder)
                        if isinstance(layer.__dict__.get("forward"), RegionGate))
        with checkpoint_step(decision.keep_first, decision.save_products) as checkpoints, \
                offloading(decision.offload) as step, chunking(decision.chunk) as chunked:
            yield
        text = decision.text
        if decision.keep:
            text += (f"; this forward ran {checkpoints.kept} checkpointed layers without a recompute" if checkpoints.kept
                     else "; this forward kept nothing: no checkpointed layer ran through sloth_fx's checkpoint")
        elif decision.mode == SELECTIVE:
            text += (f"; this forward ran {checkpoints.kept} checkpointed layers without a recompute, checkpointed "
                     f"{checkpoints.selective} saving {size_text(checkpoints.saved_bytes)} of their products' outputs "
                     f"and {checkpoints.checkpointed} whole")
        elif decision.mode != NONE:
            text += (f"; this forward checkpointed {checkpoints.checkpointed} layers through sloth_fx's checkpoint"
                     if checkpoints.checkpointed else "; no checkpointed layer ran through sloth_fx's checkpoint")
        if step is not None:
            layers, nbytes = step.moved()
            text += (f"; this forward moved {layers} layers' inputs ({size_text(nbytes)}) to host memory" if layers
                     else "; this forward moved nothing: no checkpointed layer ran through sloth_fx's checkpoint")
        if chunked is not None:
            text += (f"; this forward ran {chunked.calls} MLPs over chunks of tokens" if chunked.calls
                     else "; this forward chunked nothing: no MLP was rewritten by chunked_mlp")
        self.owner.checkpointing_decision(decision.mode, text)
