"""What a decoder layer computes and keeps per token, read from the model and its config: the
widths of its MLPs (:func:`mlp_widths`) and what its products keep for a selective recompute
(:func:`product_bytes_per_token`). The memory budget (:mod:`sloth_fx.memory.budget`) predicts a
step from them.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def mlp_widths(config: Any, hidden: int) -> tuple[int, int]:
    """``(dense, routed)``: the intermediate width per token of a layer's dense MLPs and of its
    routed experts, from a transformers config.

    A dense model's MLP is ``intermediate_size`` wide (``4·hidden`` where the config gives none).
    An MoE model (``num_experts_per_tok``) sends each token through ``k`` experts of
    ``moe_intermediate_size`` (Qwen-MoE) or ``intermediate_size`` (Mixtral, OLMoE, GPT-OSS) each,
    the fused op saving ``[T·k, 2I]``, and through a shared expert of
    ``shared_expert_intermediate_size`` where there is one (Qwen2-MoE), a dense MLP."""
    dense = getattr(config, "intermediate_size", None) or 4 * hidden
    top_k = getattr(config, "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k <= 0:
        return dense, 0
    expert = getattr(config, "moe_intermediate_size", None) or dense
    return getattr(config, "shared_expert_intermediate_size", None) or 0, top_k * expert


def decoder_layers(decoder: nn.Module) -> list[nn.Module]:
    """The layers of a decoder: the modules of its ``nn.ModuleList`` children."""
    return [layer for child in decoder.children() if isinstance(child, nn.ModuleList) for layer in child]


def product_bytes_per_token(decoder: nn.Module, element_size: int) -> int:
    """What one layer's products save per token when it recomputes selectively, counted on the
    first layer: the outputs of its LoRA linears (``element_size`` bytes each) and their fp32
    ``x·Aᵀ``; and, in an MoE layer, what the routed-experts op keeps for its recompute
    (:mod:`sloth_fx.kernels.routed_experts`): each of the token's ``k`` slots' ``[2I]`` gate/up
    product and int64 place, the ``H``-wide output, and with LoRA on the experts (PEFT's
    ``ParamWrapper``, which has a ``parameter_name``) each slot's fp32 ``x·Aᵀ`` of both projections.
    0 for a dense model without LoRA linears: nothing is saved."""
    layers = decoder_layers(decoder)
    if not layers:
        return 0
    linears = expert_ranks = 0
    for module in layers[0].modules():
        ranks = getattr(module, "r", None)
        if not (hasattr(module, "lora_A") and isinstance(ranks, dict)):
            continue
        rank = sum(ranks[name] for name in getattr(module, "active_adapters", ()) if name in ranks)
        if hasattr(module, "parameter_name"):
            expert_ranks += rank
        elif rank and isinstance(getattr(module, "out_features", None), int):
            linears += module.out_features * element_size + 4 * rank
    return linears + _routed_bytes_per_token(getattr(decoder, "config", None), element_size, expert_ranks)


def _routed_bytes_per_token(config: Any, element_size: int, expert_ranks: int) -> int:
    """The routed-experts op's saved results per token (:func:`product_bytes_per_token`); 0
    without routed experts."""
    if config is None:
        return 0
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        return 0
    routed = mlp_widths(config, hidden)[1]
    if not routed:
        return 0
    k = config.num_experts_per_tok
    return (2 * routed + hidden) * element_size + 8 * k + 4 * k * expert_ranks
