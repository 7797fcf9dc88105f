"""SFT with packing on a JSONL file (one ``{"text": ...}`` per line), LoRA, sloth_fx, TRL.

    python examples/sft_packing_jsonl.py                                   # CPU, tiny random model
    python examples/sft_packing_jsonl.py --model meta-llama/Llama-3.2-1B   # GPU, a real model

Packing (TRL's default "bfd" strategy) puts several documents in one row without padding; each
keeps its own attention through its position ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

import sloth_fx
from tiny import load

DATA = Path(__file__).parent / "data" / "sft.jsonl"


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Hub causal LM (GPU); default: a tiny random Llama on CPU")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--output", default="out/sft")
    args = parser.parse_args(argv)

    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines() if line.strip()]
    model, tokenizer = load(args.model, texts)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model = sloth_fx.optimize(model)  # before the trainer: TRL wraps the forward it finds

    config = SFTConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=2, packing=True,
        max_length=args.max_length, logging_steps=1, report_to=[], save_strategy="no",
        # a real model is loaded in bfloat16: bf16 autocast changes nothing and the LoRA rewrites run;
        # the tiny model is float32 on CPU, where bf16 autocast would make them refuse
        bf16=bool(args.model), use_cpu=not args.model,
    )
    dataset = load_dataset("json", data_files=args.data, split="train")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    print(sloth_fx.explain(model).splitlines()[-1])  # the rewrite sites running in the model
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


if __name__ == "__main__":
    main()
