"""What the trainer tests share: a word-level tokenizer over a tiny model's vocabulary, small
seeded data sets in the shapes each trainer reads, and a run that returns the logged losses.

Nothing is downloaded: the tokenizer is built with the ``tokenizers`` library, the data from a
seeded generator. Tokens are ``w0 .. w97`` (ids 3..100), so they fit the tiny models' 101-token
vocabulary beside ``<pad>``, ``<eos>`` and ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback

WORDS = 98


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _words(gen: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high, (1,), generator=gen))
    return " ".join(f"w{int(i)}" for i in torch.randint(0, WORDS, (n,), generator=gen))


def token_dataset(rows: int = 12, length: int = 12) -> Dataset:
    """Pre-tokenized causal-LM rows of one length (what ``Trainer`` takes as is)."""
    ids = torch.randint(3, WORDS + 3, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * length] * rows})


def text_dataset(rows: int = 12) -> Dataset:
    """Plain-text rows of 4 to 11 words (SFT's ``text`` column)."""
    gen = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"text": [_words(gen, 4, 12) for _ in range(rows)]})


def preference_dataset(rows: int = 12) -> Dataset:
    """Prompt, chosen and rejected completions of different lengths (DPO's columns)."""
    gen = torch.Generator().manual_seed(0)
    columns: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(rows):
        for name, (low, high) in zip(columns, ((3, 7), (2, 6), (2, 6))):
            columns[name].append(_words(gen, low, high))
    return Dataset.from_dict(columns)


SHARED_ARGS: dict[str, Any] = dict(
    max_steps=3, per_device_train_batch_size=2, use_cpu=True, report_to=[], logging_steps=1, seed=0,
    save_strategy="no", learning_rate=1e-2, disable_tqdm=True,
)


def trained(trainer_class: type[Trainer], args_class: type, model: Any, tmp_path: Path, arguments: dict[str, Any],
            **trainer_arguments: Any) -> Trainer:
    """``trainer_class`` on ``model``, its ``args_class`` made of :data:`SHARED_ARGS` updated by
    ``arguments`` (output under ``tmp_path``), with :class:`FirstStepGradients`, after ``train()``."""
    args = args_class(output_dir=str(tmp_path / "run"), **{**SHARED_ARGS, **arguments})
    trainer = trainer_class(model=model, args=args, callbacks=[FirstStepGradients()], **trainer_arguments)
    trainer.train()
    return trainer


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


class FirstStepGradients(TrainerCallback):
    """Keeps the gradients the optimizer is about to apply at the first step, where both runs'
    weights are still the same: the exactness check proper (see :func:`assert_same_training`)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def first_step_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, FirstStepGradients)]
    return callback.grads


# AdamW moves every adapter element by about the learning rate a step whatever its gradient's size,
# so where a gradient element is near zero, a rounding-sized difference in it (a fused op sums in
# another order) moves the element by a visible fraction of a step after a few steps. Measured
# here: first-step gradients as close to a float64 run as HF's own (within 1.7x), saved adapters
# apart by up to 8.3e-5 after 3 steps of 1e-2 (DPO, Mistral, a reference model). So exactness is
# judged on the first step's gradients, and the adapters after 3 steps to 2% of one step (a wrong
# gradient moves an element by whole steps).
ADAPTER_ATOL = 2e-2 * SHARED_ARGS["learning_rate"]


def assert_same_training(original: Trainer, optimized: Trainer, tmp_path: Path, rtol: float = 1e-5,
                         exact: Trainer | None = None) -> None:
    """Both trainers applied the same gradients at the first step (relative 1e-4, or 1e-5 of the
    tensor's largest element), logged the same loss at every step (relative ``rtol``) and save the
    same adapters (``save_pretrained`` of each model, tensor by tensor, to :data:`ADAPTER_ATOL`).

    ``exact``, where given, is the un-optimized model's run in float64: the optimized run's adapters
    are then judged against it, to the same tolerance, instead of against ``original``'s (for models
    whose float32 run itself strays from float64 by more than that, the steps amplifying its own
    rounding: see tests/integration/test_moe_trainers.py)."""
    reference, grads = first_step_gradients(original), first_step_gradients(optimized)
    assert reference.keys() == grads.keys() and reference
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                   msg=lambda m: f"first-step gradient of {name}: {m}")
    assert len(losses(original)) == len(losses(optimized)) == SHARED_ARGS["max_steps"]
    for step, (a, b) in enumerate(zip(losses(original), losses(optimized))):
        assert abs(a - b) <= rtol * abs(a), f"step {step}: loss {b} against {a} without sloth_fx"
    saved = []
    for name, trainer in (("original", original if exact is None else exact), ("optimized", optimized)):
        trainer.model.save_pretrained(tmp_path / name)
        saved.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    assert saved[0].keys() == saved[1].keys() and saved[0]
    for key in saved[0]:
        torch.testing.assert_close(saved[1][key], saved[0][key].to(saved[1][key].dtype), rtol=1e-4, atol=ADAPTER_ATOL,
                                   msg=lambda m: f"{key}: {m}")
