"""DPO with LoRA and sloth_fx: the reference is the base model (the adapters switched off).

    python examples/dpo.py                                        # CPU, tiny random model
    python examples/dpo.py --model Qwen/Qwen2.5-0.5B-Instruct     # GPU, a real model
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer

import sloth_fx
from tiny import load

PAIRS = [  # prompt, chosen, rejected
    ("what does the sloth do ?", "the sloth climbs the tree .", "the sloth runs past the river ."),
    ("where is the cat ?", "the cat sleeps on a book .", "a bird sings to the moon ."),
    ("what does the model learn ?", "the model learns from the data .", "the model climbs a small graph ."),
    ("who sings ?", "a bird sings to the moon .", "the dog sleeps ."),
]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hub causal LM (GPU); default: a tiny random Llama on CPU")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="out/dpo")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model, [text for pair in PAIRS for text in pair])
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = sloth_fx.optimize(model)  # before the trainer: TRL wraps the forward it finds

    dataset = Dataset.from_dict({key: [pair[i] for pair in PAIRS] * 4 for i, key in enumerate(("prompt", "chosen", "rejected"))})
    config = DPOConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=2, logging_steps=1, report_to=[],
        save_strategy="no", bf16=bool(args.model), use_cpu=not args.model,  # bf16 only over a bfloat16 base
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    print(sloth_fx.explain(model).splitlines()[-1])
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    main()
