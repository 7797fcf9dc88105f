"""A user's Trainer script, for launching on two CPU processes: 3 steps of transformers' ``Trainer``
on the tiny LoRA Llama of ``two_rank_training`` (fp32), 2 rows a process a step; rank 0 writes the
losses that Trainer logged, the world size and, optimized, the rewrites per pass as JSON to the
path given.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed/trainer_script.py OUT.json [--optimize]

``--optimize`` calls ``sloth_fx.optimize`` on the model before the trainer is built (and wraps it
in DDP), as README's "Several GPUs" says to.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models, beside two_rank_training

from tiny_models import COMMON  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402
from two_rank_training import lora_llama  # noqa: E402

import sloth_fx  # noqa: E402

STEPS, ROWS_PER_PROCESS, LENGTH = 3, 2, 12


def rows(count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` rows of random ids, every position labelled (the model shifts the labels)."""
    ids = torch.randint(3, COMMON["vocab_size"], (count, LENGTH), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def main(out: str, optimize: bool) -> None:
    model = lora_llama(checkpointing=False)
    if optimize:
        sloth_fx.optimize(model)
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, per_device_train_batch_size=ROWS_PER_PROCESS, max_steps=STEPS,
                                 learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows(2 * ROWS_PER_PROCESS * STEPS),
                          data_collator=default_data_collator)
        trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        rewrites = {p: sloth_fx.report(model).count(p) for p in sloth_fx.available_passes()} if optimize else {}
        Path(out).write_text(json.dumps({"losses": losses, "world_size": trainer.args.world_size, "rewrites": rewrites}))


if __name__ == "__main__":
    main(sys.argv[1], "--optimize" in sys.argv[2:])
