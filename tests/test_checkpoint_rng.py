"""Dropout under activation checkpointing: the recompute replays the forward's random numbers.

HF's own checkpointed gradients equal its un-checkpointed ones; an optimized model's must equal
HF's, bit for bit in the masks, whatever draws the random numbers (PEFT's lora_dropout, attention
dropout inside SDPA, GPT-2's residual and embedding dropout).
"""

import pytest
import torch
from tiny_models import assert_same_training_step, batch, loss_and_grads, tiny_model, twin
from transformers import AutoModelForCausalLM, GPT2Config

import sloth_fx

pytestmark = pytest.mark.usefixtures("reference_ops")

def seeded_step(model, inputs, seed=7):
    torch.manual_seed(seed)
    return loss_and_grads(model, inputs)


def assert_same_seeded_step(original, optimized, inputs):
    loss_ref, grads_ref = seeded_step(original, inputs)
    loss, grads = seeded_step(optimized, inputs)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("where", ["lora_dropout", "attention_dropout"])
def test_llama_dropout_under_checkpointing_is_exact(where, monkeypatch):
    original = tiny_model("llama", lora=True, checkpointing=True, lora_dropout=0.1 if where == "lora_dropout" else 0.0)
    if where == "attention_dropout":
        for module in original.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1
    optimized = sloth_fx.optimize(twin(original))
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["preserve_rng_state"])
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr("sloth_fx.memory.checkpoint.checkpoint", counted)
    assert_same_seeded_step(original, optimized, batch())
    # each layer's checkpoint is sloth_fx's, which replays the RNG, whatever transformers does
    assert calls == [True, True]
    assert "; this forward checkpointed 2 layers through sloth_fx's checkpoint" in sloth_fx.explain(optimized)
    # the masks are really random: another seed gives another loss
    assert not torch.equal(seeded_step(optimized, batch(), seed=8)[0], seeded_step(optimized, batch())[0])


def test_gpt2_default_dropout_under_checkpointing_is_exact():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=32)
    original = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    original.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    original.train()
    optimized = sloth_fx.optimize(twin(original))
    assert_same_seeded_step(original, optimized, batch())


def test_checkpointing_without_dropout_is_unchanged():
    original = tiny_model("mistral", lora=True, checkpointing=True)
    assert_same_training_step(original, sloth_fx.optimize(twin(original)), batch())
