"""Random-init models, QLoRA quantisation, LoRA adapters and the optimizer, identical for every system.

Same seed, same shape, same device: the same weights in every subprocess (the base weights are
drawn on the device itself, by transformers' own initialisation, after ``torch.manual_seed``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks.configs import LORA_ALPHA, LORA_DROPOUT, LORA_R, Config, ModelShape, lora_targets

LEARNING_RATE = 1e-4  # AdamW's rate; any fixed value works as long as every system uses it


def hf_config(shape: ModelShape) -> Any:
    """The transformers config of a shape (LlamaConfig, MistralConfig, Qwen3MoeConfig or
    MixtralConfig), sdpa attention, no cache. MoE: every layer sparse (Qwen3-MoE's
    ``decoder_sparse_step=1``, no ``mlp_only_layers``), no router logits in the output (so no
    auxiliary loss), no router jitter; the experts run as transformers picks by default
    (``config._experts_implementation``, ``grouped_mm`` in transformers 5)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=False,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if shape.attn_head_dim:
        common["head_dim"] = shape.attn_head_dim
    if shape.family == "llama":
        cfg = LlamaConfig(**common)
    elif shape.family == "mistral":
        cfg = MistralConfig(sliding_window=None, **common)
    elif shape.family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            num_experts=shape.experts, num_experts_per_tok=shape.experts_per_token,  # type: ignore[attr-defined]
            moe_intermediate_size=shape.moe_intermediate, norm_topk_prob=shape.norm_topk_prob,  # type: ignore[attr-defined]
            decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, output_router_logits=False, **common,
        )
    elif shape.family == "mixtral":
        common["intermediate_size"] = shape.moe_intermediate  # type: ignore[attr-defined]
        cfg = MixtralConfig(
            num_local_experts=shape.experts, num_experts_per_tok=shape.experts_per_token,  # type: ignore[attr-defined]
            sliding_window=None, router_jitter_noise=0.0, output_router_logits=False, **common,
        )
    else:
        raise ValueError(f"unknown model family {shape.family!r}")
    cfg._attn_implementation = "sdpa"
    return cfg


def model_class(shape: ModelShape) -> type:
    from transformers import LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM

    return {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
            "mixtral": MixtralForCausalLM}[shape.family]


def build_base_model(shape: ModelShape, device: torch.device | str, seed: int, dtype: torch.dtype) -> nn.Module:
    """A random-init causal LM of ``shape``, its weights drawn on ``device`` from ``seed``."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    with torch.device(device):
        model = model_class(shape)._from_config(hf_config(shape), dtype=dtype)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM, with or without the PEFT wrapper around it."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(m, "model", m)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every ``nn.Linear`` inside the decoder layers for a ``bitsandbytes.nn.Linear4bit``
    (nf4, double quantisation, ``compute_dtype``) quantised from the layer's current weights, in
    place, on the device the weights are on. The embeddings and lm_head stay as they are (as with
    ``BitsAndBytesConfig(load_in_4bit=True)``, which skips the head). Marks the model
    ``is_loaded_in_4bit`` so that PEFT puts its bnb LoRA layers on them.

    Only ``nn.Linear`` is swapped, as transformers' ``replace_with_bnb_linear`` does (it converts
    ``type(module) is nn.Linear`` and Conv1D only): an MoE layer's routed experts, 3-D
    ``nn.Parameter`` stacks in transformers 5 (``mlp.experts.gate_up_proj``/``down_proj``), and its
    router (``mlp.gate``, a module holding a plain weight) stay in the model's dtype under
    ``load_in_4bit`` too, and stay so here."""
    import bitsandbytes as bnb

    for layer in decoder_layers(model):
        for name, mod in list(layer.named_modules()):
            if type(mod) is not nn.Linear:
                continue
            device = mod.weight.device
            q = bnb.nn.Linear4bit(
                mod.in_features,
                mod.out_features,
                bias=mod.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                mod.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            )
            if mod.bias is not None:
                q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
            q = q.to(device)  # Params4bit.to(device) quantises the weights
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, q)
            del mod
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """HF activation checkpointing of each decoder layer, non-reentrant (``use_reentrant=False``:
    needs no input that requires grad, and TorchDynamo can trace it)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_lora(model: nn.Module, seed: int, cfg: Config) -> nn.Module:
    """Wrap in PEFT LoRA: r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down (a dense model) or on
    q,k,v,o and, through ``target_parameters``, the routed experts' ``mlp.experts.gate_up_proj`` and
    ``mlp.experts.down_proj`` (an MoE model: PEFT's ParamWrapper, r per expert; the router stays
    frozen); adapters drawn from ``seed``. With ``cfg.experts == "nf4"`` the experts' stacks are
    then quantized by ``sloth_fx.quantize_experts`` (nf4, double quantization, blocks of 64, as
    ``quantize_nf4`` quantizes the linears): transformers' bitsandbytes path leaves them bf16."""
    from peft import LoraConfig, get_peft_model

    modules, parameters = lora_targets(cfg.shape)
    torch.manual_seed(seed + 1)
    lcfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(modules),
        target_parameters=list(parameters) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg)
    if cfg.experts == "nf4":
        import sloth_fx

        sloth_fx.quantize_experts(model)
    return model


def base_model_for(cfg: Config, device: torch.device | str, seed: int, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The random-init base model of a configuration, quantised to nf4 for QLoRA, checkpointing
    enabled as configured; no adapters yet (a system may patch it before they go on)."""
    model = build_base_model(cfg.shape, device, seed, dtype)
    if cfg.precision == "nf4":
        quantize_nf4(model, compute_dtype=dtype)
    if cfg.checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    return model


def make_optimizer(model: nn.Module, lr: float = LEARNING_RATE) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad (the LoRA adapters only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: LoRA adapters missing")
    return torch.optim.AdamW(params, lr=lr)


def count_params(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (a 4-bit weight counts as its stored elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}
