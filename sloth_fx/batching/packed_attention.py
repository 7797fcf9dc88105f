"""Packed attention: causal attention per sequence of a packed row, with no [T×T] mask.

A packed call carries the sequence boundaries that transformers already threads through to every
attention function (``TransformersKwargs``, as ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
makes them): ``cu_seq_lens_q`` / ``cu_seq_lens_k``, int tensors ``[N+1]`` with ``cu[0] = 0`` and
``cu[n+1] - cu[n]`` the length of sequence n over the flattened ``B*S`` tokens, and
``max_length_q`` / ``max_length_k``, Python ints at least every length. Token t of sequence n
(``cu[n] <= t < cu[n+1]``) attends to tokens ``cu[n] .. t``:

    out_t = softmax(scale * q_t · K[cu[n]..t]ᵀ) V[cu[n]..t]

which is what the padded run computes for the same tokens, with no FLOPs on padding and no mask.

- CUDA, fp16/bf16: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's varlen kernel),
  with the keyword spellings of the installed torch found once at import (causality and GQA
  are spelt differently across torch 2.10-2.13).
- Elsewhere (CPU, fp32, no varlen): the sequences are scattered into a right-padded
  ``[N, max_len]`` batch and run through SDPA with ``is_causal=True``. A query at position p of
  its sequence sees keys 0..p only, all of them real, so padding at the end never enters a real
  output: exact, and traceable (the gather indices come from ``cu`` by tensor ops).

Without boundaries the call goes to transformers' own sdpa function, with sdpa's own mask
function registered under this name, so an unpacked batch runs exactly as ``attn_implementation="sdpa"``.
A packed call's mask costs nothing: the padding-free call passes an all-ones 2-D
``attention_mask``, for which sdpa's mask function returns ``None`` (and HF's packed-row detection,
which would build a dense mask, only looks at calls without a mask). Calls with boundaries and a
dense mask anyway (a packed row without the all-ones mask) are still right: boundaries win.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sloth_fx_packed"
_BEFORE = "_sloth_fx_attn_before"  # the model's implementation before install, kept on the model


def _varlen_spelling() -> tuple[Any, dict[str, Any], bool] | None:
    """``(varlen_attn, causal keyword arguments, has enable_gqa and scale)`` of this torch, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch >= 2.12: causal is the window (-1, 0)
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # torch 2.10 / 2.11
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params and "scale" in params


_VARLEN = _varlen_spelling()


def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: ``query [B, H, S, D]``, ``key``/``value [B, Hkv, S, D]`` →
    ``([B, S, H, D], None)``. With ``cu_seq_lens_q`` in ``kwargs``: causal attention within each
    sequence (``attention_mask`` is ignored, the boundaries define it); without: HF's sdpa."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for name in ("sliding_window", "softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:  # install refuses these models; a call that has one is a bug
            raise ValueError(f"packed attention cannot do {name}={kwargs[name]!r} exactly")
    cu_k = cu_q if kwargs.get("cu_seq_lens_k") is None else kwargs["cu_seq_lens_k"]
    max_q = kwargs["max_length_q"]
    max_k = max_q if kwargs.get("max_length_k") is None else kwargs["max_length_k"]
    b, h, s, d = query.shape
    hkv = key.shape[1]
    scale = d**-0.5 if scaling is None else scaling
    # [B, H, S, D] -> [B*S, H, D]: the boundaries index the flattened tokens, as FlashAttention's do
    q, k, v = (x.transpose(1, 2).reshape(b * s, x.shape[1], d) for x in (query, key, value))
    if _use_varlen(q, dropout, scale):
        out = _varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale, h // hkv)
    else:
        out = _padded_sdpa(q, k, v, cu_q, max_q, scale, dropout, enable_gqa=hkv != h)
    return out.reshape(b, s, h, d), None


def _use_varlen(q: torch.Tensor, dropout: float, scale: float) -> bool:
    if _VARLEN is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or dropout:
        return False
    return _VARLEN[2] or scale == q.shape[-1] ** -0.5  # without a scale argument only the default is exact


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
            max_q: int, max_k: int, scale: float, groups: int) -> torch.Tensor:
    varlen_attn, causal, gqa_and_scale = _VARLEN
    if gqa_and_scale:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, enable_gqa=groups > 1, **causal)
    if groups > 1:  # query head j reads kv head j // groups, as HF's repeat_kv lays them out
        k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **causal)


def _padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scale: float, dropout: float, enable_gqa: bool) -> torch.Tensor:
    """Scatter token t of sequence n to row n, column ``t - cu[n]`` of a right-padded batch, run
    causal SDPA, gather back. Only self-attention (same boundaries for q and k) comes here."""
    t = q.shape[0]
    n = cu.shape[0] - 1
    token = torch.arange(t, device=q.device)
    seq = torch.searchsorted(cu[1:].to(token.dtype), token, right=True)  # number of sequences ended at or before t
    col = token - cu.to(token.dtype)[seq]

    def pad(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(n, max_len, *x.shape[1:]).index_put((seq, col), x).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), dropout_p=dropout, is_causal=True,
                                         scale=scale, enable_gqa=enable_gqa)
    return out.transpose(1, 2)[seq, col]


AttentionInterface.register(NAME, packed_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def install_packed_attention(model: nn.Module) -> str | None:
    """Switch ``model`` (an HF model, or a PEFT model around one) to packed attention; ``None`` when
    done (or already done), else the reason it refused, with the model unchanged. Only models on
    ``sdpa`` are switched, since unpacked calls delegate to sdpa and must run exactly as before."""
    base = _hf_model(model)
    if base is None:
        return f"{type(model).__name__} is not a transformers model"
    current = base.config._attn_implementation
    if current == NAME:
        return None
    reason = _refusal(base, current)
    if reason is not None:
        return reason
    base.set_attn_implementation(NAME)
    base.__dict__[_BEFORE] = current
    return None


def uninstall_packed_attention(model: nn.Module) -> None:
    """Give ``model`` back the attention implementation it had before ``install_packed_attention``."""
    base = _hf_model(model)
    if base is not None and _BEFORE in base.__dict__:
        base.set_attn_implementation(base.__dict__.pop(_BEFORE))


def _refusal(base: PreTrainedModel, current: str | None) -> str | None:
    if current != "sdpa":
        return f"attention is {current!r}, not 'sdpa' (packed attention delegates unpacked calls to sdpa)"
    if not base._can_set_attn_implementation():
        return f"{type(base).__name__} does not dispatch attention through transformers' AttentionInterface"
    configs = [base.config, *(getattr(base.config, k, None) for k in base.config.sub_configs)]
    for config in filter(None, configs):
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return f"sliding-window attention (window {config.sliding_window}) is not done per sequence here"
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return "sliding-window attention layers are not done per sequence here"
        for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
            if getattr(config, name, None) is not None:
                return f"attention logit softcapping ({name}) is not done per sequence here"
        if not getattr(config, "is_causal", True):
            return "the model's attention is bidirectional; packed attention is causal"
    return None


def _hf_model(model: nn.Module) -> PreTrainedModel | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base if isinstance(base, PreTrainedModel) else None
