"""The examples' model and tokenizer: a real checkpoint when ``--model`` names one (GPU), else a
tiny random-init Llama with a word-level tokenizer over the example's own text (CPU, no download)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast


def load(name: str | None, texts: Iterable[str]) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """``(model, tokenizer)``: ``name`` from the Hub in bfloat16 on the GPU, or the tiny pair."""
    if name:
        tokenizer = AutoTokenizer.from_pretrained(name)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, device_map="cuda"), tokenizer
    words = sorted({w for text in texts for w in text.split()})
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), tokenizer
