"""QLoRA: LoRA over a 4-bit (NF4) base with sloth_fx, under transformers.Trainer. GPU only
(bitsandbytes' 4-bit layers need CUDA); on a CPU-only machine it says so and stops.

    python examples/qlora_4bit.py --model meta-llama/Llama-3.2-1B

The fused LoRA op dequantizes the base itself; explain lists the lora rewrites over 4-bit linears.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                          Trainer, TrainingArguments)

import sloth_fx

DATA = Path(__file__).parent / "data" / "sft.jsonl"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="out/qlora")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("qlora_4bit.py needs a CUDA GPU (bitsandbytes 4-bit); the other examples run on CPU")

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map="cuda")
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = sloth_fx.optimize(model)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dataset = load_dataset("json", data_files=str(DATA), split="train")
    dataset = dataset.map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    config = TrainingArguments(output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=4,
                               bf16=True, logging_steps=1, report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=config, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    print(sloth_fx.explain(model))
    print(json.dumps(trainer.state.log_history[-1]))


if __name__ == "__main__":
    main()
