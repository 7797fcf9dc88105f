"""TRL's ``SFTTrainer`` with ``padding_free=True`` on one system and configuration (run inside its
own subprocess: ``python -m benchmarks worker --stage sft``).

This is how most users meet a LoRA finetune, so it is the row they read first. The model and the
AdamW come from ``systems.prepare`` as in an e2e run; the training data are the sequences of the
configuration's batches (``benchmarks/data.py``), one dataset row each, so SFTTrainer's shuffled
batches hold the same sequences as e2e's. Everything else is SFTTrainer's own: its collator
flattens each batch into one row without padding, its loss is TRL's chunked LM head (installed on
the causal LM whatever the system patched there: sloth_fx's and Liger's fused losses do not run,
and the row's notes say which forward did), its linear learning-rate schedule and gradient
clipping apply.

A step is timed from ``on_step_begin`` to ``on_step_end`` (forward, backward, clipping, optimizer
and scheduler step, ``zero_grad``; the batch is collated before), synchronising CUDA at both ends.
The tokens of a step are counted from the batch the trainer handed its ``training_step``.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch

from benchmarks.configs import Config
from benchmarks.data import Batch, batches_for
from benchmarks.e2e import require_timed_steps, step_figures, synchronize, timed_prepare

CONFIG_PREFIX = "SFT-pf"  # an SFT row's config id is "SFT-pf/<e2e config id>"


def sft_label(cfg: Config) -> dict[str, str]:
    """The config id and description of an SFTTrainer row on ``cfg``: its own column in the report,
    beside e2e's row of the same configuration."""
    return {"config": f"{CONFIG_PREFIX}/{cfg.id}", "config_desc": f"SFTTrainer padding_free {cfg.describe()}"}


def sequences(batch: Batch) -> list[torch.Tensor]:
    """The real sequences of a batch, without padding: one per row of a padded or random batch,
    split at ``lengths`` from the single row of a packed one."""
    ids = batch.inputs["input_ids"]
    if ids.shape[0] == len(batch.lengths):
        return [ids[i, :n] for i, n in enumerate(batch.lengths)]
    return list(torch.split(ids[0], batch.lengths))


def sft_dataset(cfg: Config, steps: int, seed: int) -> Any:
    """A ``datasets.Dataset`` of ``{"input_ids": [...]}`` rows: every sequence of the ``steps``
    batches an e2e run of ``cfg`` trains on (``batch`` of them a step, so ``steps`` steps' worth)."""
    from datasets import Dataset

    rows = [{"input_ids": s.tolist()} for b in batches_for(cfg, steps, seed) for s in sequences(b)]
    return Dataset.from_list(rows)


def local_tokenizer(vocab: int) -> Any:
    """The WordLevel tokenizer of ``vocab`` made-up tokens that the Unsloth system saves beside its
    model (``systems.save_wordlevel_tokenizer``), loaded back from a temporary folder: SFTTrainer
    wants a processing class (for its pad token) and nothing may come from a hub."""
    from transformers import PreTrainedTokenizerFast

    from benchmarks.systems import save_wordlevel_tokenizer

    with tempfile.TemporaryDirectory() as d:
        save_wordlevel_tokenizer(vocab, d)
        return PreTrainedTokenizerFast.from_pretrained(d)


def sft_args(cfg: Config, steps: int, device: torch.device, output_dir: str) -> Any:
    """SFTTrainer's defaults but for what the benchmark fixes: padding-free batches of ``cfg.batch``
    sequences, ``steps`` steps, checkpointing as ``cfg``, a loss logged every step, nothing saved,
    evaluated or reported; bf16 autocast on CUDA, the CPU otherwise."""
    from trl import SFTConfig

    cuda = device.type == "cuda"
    return SFTConfig(
        output_dir=output_dir,
        padding_free=True,
        # TRL refuses padding_free without packing while max_length is set (it would not be
        # enforced); the rows are at most cfg.seq long already.
        max_length=None,
        per_device_train_batch_size=cfg.batch,
        max_steps=steps,
        gradient_checkpointing=cfg.checkpointing,
        # prepare() already enabled HF checkpointing, non-reentrant; the trainer enables it again,
        # which replaces each layer's checkpoint function (no second wrapper): with the same
        # kwargs, the same function.
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.checkpointing else None,
        bf16=cuda,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
    )


def step_clock(device: torch.device) -> Any:
    """A ``TrainerCallback`` whose ``times`` gets each optimizer step's wall time."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.times.append(time.perf_counter() - self._t0)

    return StepClock()


def fed_batch(inputs: dict[str, Any]) -> Batch:
    """The batch a step trained on, as a :class:`Batch` with its real sequence lengths: per row of
    ``attention_mask`` where there is one (a padded batch), else between the restarts of
    ``position_ids`` (a padding-free row), else every position."""
    ids = inputs["input_ids"].cpu()
    if inputs.get("attention_mask") is not None:
        lengths = [int(n) for n in inputs["attention_mask"].sum(-1).tolist()]
    elif inputs.get("position_ids") is not None:
        starts = (inputs["position_ids"].reshape(-1) == 0).nonzero().flatten().tolist() + [ids.numel()]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = [ids.shape[-1]] * ids.shape[0]
    return Batch({"input_ids": ids}, lengths)


def step_batches(fed: list[Batch], steps: int) -> list[Batch] | None:
    """One :class:`Batch` per optimizer step from the batches ``training_step`` was handed: the
    same list when there is one a step; the micro-batches of each step joined when a trainer
    hands a whole number of them per step (Unsloth's patched SFTTrainer accumulates 2 per step,
    its log says, whatever ``SFTConfig`` asked: 16 batches over 8 steps on the H200); tokens/s
    then counts every micro-batch of a step. None when the count is no multiple of ``steps``, or
    when two batches of a step are equal (one batch recorded twice would count its tokens twice)."""
    if not fed or len(fed) % steps:
        return None
    k = len(fed) // steps
    if k == 1:
        return fed
    for i in range(0, len(fed), k):
        ids = [b.inputs["input_ids"] for b in fed[i:i + k]]
        if any(a.shape == b.shape and torch.equal(a, b) for a, b in zip(ids, ids[1:])):
            return None
    return [Batch({"input_ids": torch.cat([b.inputs["input_ids"].reshape(-1) for b in fed[i:i + k]])[None]},
                  [n for b in fed[i:i + k] for n in b.lengths]) for i in range(0, len(fed), k)]


def record_inputs(trainer: Any) -> list[dict[str, Any]]:
    """Wrap ``trainer.training_step`` so that the returned list gets the token tensors of every
    batch it is handed (read once training is over: reading them in the step would synchronise)."""
    fed: list[dict[str, Any]] = []
    step = trainer.training_step

    def training_step(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        fed.append({k: inputs.get(k) for k in ("input_ids", "attention_mask", "position_ids")})
        return step(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    return fed


def _forward_name(module: Any) -> str:
    """Whose code a module's ``forward`` runs (its code's qualified name: ``functools.wraps`` would
    lend a patched forward the class's name)."""
    fn = getattr(module.forward, "__func__", module.forward)
    code = getattr(fn, "__code__", None)
    return code.co_qualname if code is not None else type(fn).__qualname__


def run_sft(
    system: str, cfg: Config, *, device: str = "cuda", steps: int = 8, warmup: int = 3, seed: int = 0, **opts: Any
) -> dict[str, Any]:
    """Prepare ``system`` on ``cfg`` and train ``steps`` steps with SFTTrainer (padding-free); the
    result row as a dict, the shape of an e2e row. Raises on failure (the worker turns exceptions
    into failure rows)."""
    require_timed_steps(steps, warmup, opts.pop("allow_few_steps", False))
    dev = torch.device(device)
    row: dict[str, Any] = {"system": system, **sft_label(cfg), "status": "running"}
    dataset = sft_dataset(cfg, steps, seed)
    prepared, setup = timed_prepare(system, cfg, dev, seed, opts)
    row.update(setup)
    import trl  # after prepare: a system that cannot run fails without waiting for TRL's import
    from trl import SFTTrainer

    clock = step_clock(dev)
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        trainer = SFTTrainer(
            model=prepared.model, args=sft_args(cfg, steps, dev, out_dir), train_dataset=dataset,
            processing_class=local_tokenizer(cfg.shape.vocab), optimizers=(prepared.optimizer, None),
            callbacks=[clock],
        )
        row["trainer_setup_s"] = time.perf_counter() - t0
        fed = record_inputs(trainer)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        trainer.train()
    row["peak_bytes"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    causal_lm = prepared.model.get_base_model() if hasattr(prepared.model, "get_base_model") else prepared.model
    # What ran, as SFTTrainer (and Unsloth's patches of it) left it: padding-free or not, and
    # whose forward computed the loss.
    row["notes"] = dict(prepared.notes, trl=trl.__version__, padding_free=bool(getattr(trainer, "padding_free", None)),
                        loss_forward=_forward_name(causal_lm))
    if prepared.after_training is not None:
        row["notes"].update(prepared.after_training())
    row["losses"] = [h["loss"] for h in sorted(trainer.state.log_history, key=lambda h: h["step"]) if "loss" in h]
    row["step_times"] = clock.times
    per_step = step_batches([fed_batch(f) for f in fed], steps)
    if len(clock.times) != steps or per_step is None:
        raise RuntimeError(f"expected {steps} steps, timed {len(clock.times)}, fed {len(fed)} batches")
    row["notes"]["micro_batches_per_step"] = len(fed) // steps
    row.update(step_figures(cfg, per_step, clock.times, warmup, row["matmul_flops"]))
    row["status"] = "ok"
    return row
