"""Train LoRA adapters with sloth_fx in a plain loop, save them, load them back onto the base,
merge them into its weights and generate.

    python examples/save_merge_generate.py                                   # CPU, tiny random model
    python examples/save_merge_generate.py --model meta-llama/Llama-3.2-1B   # GPU, a real model

sloth_fx leaves the weights and adapter names as PEFT made them, so ``save_pretrained`` writes
what PEFT would; ``generate()`` and ``eval()`` run the original forward.
"""

from __future__ import annotations

import argparse
import copy

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import sloth_fx
from tiny import load

TEXT = "the sloth climbs the tree . the cat sleeps on a book . a bird sings to the moon ."


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hub causal LM (GPU); default: a tiny random Llama on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="out/adapter")
    args = parser.parse_args(argv)

    base, tokenizer = load(args.model, [TEXT])
    pristine = copy.deepcopy(base)  # get_peft_model changes the base in place; keep one to load onto
    model = sloth_fx.optimize(get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")))
    batch = tokenizer([TEXT] * 2, return_tensors="pt").to(base.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(args.steps):
        loss = model(**batch, labels=batch["input_ids"]).loss  # outputs.logits is None here
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(args.output)  # the adapters only, as PEFT saves them

    merged = PeftModel.from_pretrained(pristine, args.output).merge_and_unload().eval()
    prompt = tokenizer("the sloth", return_tensors="pt").to(merged.device)
    out = merged.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    print(f"last loss {loss.item():.4f}; generated: {text}")
    return text


if __name__ == "__main__":
    main()
