"""Tiny random-init decoder models for the CPU suite (no downloads: configs only)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Olmo2Config, OlmoConfig,
                          Phi3Config, PhiConfig, Qwen2Config, Qwen3Config)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import sloth_fx
from sloth_fx.report import PassLog, Report

# Current transformers checkpoint a layer inside its forward (a wrapper), so the checkpoint lies in
# sloth_fx's captured graph; 5.17 and before checkpoint in the layer's __call__, around the capture
# (sloth_fx.memory.checkpoint.EagerCheckpoint). Assertions on how the checkpoint ran depend on which.
CHECKPOINT_IN_FORWARD = LlamaDecoderLayer.forward.__code__.co_name == "forward_with_checkpointing"
# Llama's seven projections, and Phi-3's fused ones (qkv_proj, gate_up_proj), which no other family has
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101)


def config(family: str, layers: int = 2):
    if family == "llama":
        return LlamaConfig(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=4)
    if family == "mistral":
        return MistralConfig(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=2, sliding_window=None)
    if family == "gemma":
        return GemmaConfig(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=1, head_dim=16)
    if family == "olmo":  # q, k, v clamped in place to +-clip_qkv; 0.1 clips a good share of them
        return OlmoConfig(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=4, clip_qkv=0.1, eos_token_id=0)
    if family == "olmo2":  # RMSNorm after attention and after the MLP, before each residual add
        return Olmo2Config(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=4, eos_token_id=0)
    if family == "phi":
        return PhiConfig(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=4)
    if family == "qwen2":  # q, k and v with a bias
        return Qwen2Config(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=2)
    if family == "qwen3":  # RMSNorm of each head of q and k (q_norm, k_norm) before the rotary embedding
        return Qwen3Config(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=2, head_dim=16)
    if family == "phi3":  # fused qkv_proj and gate_up_proj (the MLP's gate and up are chunks of one linear)
        return Phi3Config(**{**COMMON, "num_hidden_layers": layers}, num_key_value_heads=4, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def tiny_model(family: str = "llama", *, lora: bool = False, checkpointing: bool = False, layers: int = 2,
               dtype: torch.dtype = torch.float32, seed: int = 0,
               prepare: Callable[[nn.Module], nn.Module] | None = None, lora_dropout: float = 0.0) -> nn.Module:
    """A random-init model of ``family`` in ``dtype``; ``prepare`` (say, swapping its linears for
    4-bit ones) runs before PEFT LoRA goes on all seven projections (Phi-3: its four), with non-zero B."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, layers), attn_implementation="sdpa").to(dtype)
    if prepare is not None:
        model = prepare(model)
    if lora:
        targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=targets))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give it values so every gradient is exercised
                nn.init.normal_(p, std=0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def wrong_norm_pass(gm: torch.fx.GraphModule, log: PassLog) -> torch.fx.GraphModule:
    """A deliberately wrong rewrite (rsqrt -> sqrt, as in RMSNorm) that verify must drop."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.rsqrt:
            node.target = torch.sqrt
            log.rewrite("somewhere", "deliberately wrong")
    return gm


def assert_refused_unchanged(model: nn.Module, pass_name: str) -> Report:
    """Optimize ``model`` with one pass that must refuse everywhere: the loss (same random state,
    for dropout) is the original's bit for bit and nothing is rewritten; the report."""
    original = twin(model)
    optimized = sloth_fx.optimize(model, passes=[pass_name])
    torch.manual_seed(3)
    loss = optimized(**batch()).loss
    torch.manual_seed(3)
    assert torch.equal(loss, original(**batch()).loss)
    report = sloth_fx.report(optimized)
    assert report.count(pass_name) == 0
    return report


def batch(vocab: int = 101, b: int = 2, s: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    labels = ids.clone()
    labels[0, :2] = -100
    return {"input_ids": ids, "labels": labels}


def loss_and_grads(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same_training_step(original: nn.Module, optimized: nn.Module, inputs: dict[str, torch.Tensor],
                              rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """The optimized model's loss and every trainable parameter's gradient equal the original's."""
    loss_ref, grads_ref = loss_and_grads(original, inputs)
    loss, grads = loss_and_grads(optimized, inputs)
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys() and grads
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
