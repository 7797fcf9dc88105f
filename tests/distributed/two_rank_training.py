"""Three SGD steps of a tiny Llama with LoRA on two CPU processes (gloo) and on one, for comparing
data-parallel training (DDP, FSDP2) with a single process on the whole batch.

Exactness needs equal loss normalisation: each rank's loss is the mean over its own labelled
tokens and DDP and FSDP2 average the ranks' gradients, which is the mean over the whole batch only
when every rank has as many labelled tokens. :func:`global_batch` makes both halves alike in that.
Every process builds the model from one seed (FSDP2 shards each rank's own copy; DDP broadcasts
rank 0's anyway).
"""

from __future__ import annotations

import functools
import gc
import re
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from tiny_models import COMMON, LORA_TARGETS
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, LlamaConfig

import sloth_fx
from sloth_fx.memory import token_chunks

WORLD = 2
STEPS = 3
LEARNING_RATE = 0.5
ROWS, LENGTH, PADS = 4, 10, 3
ORDERS = (None, "before", "after")  # when optimize is called: never (the control), before or after wrapping
Result = dict[str, Any]  # "losses", "adapters" {name: tensor}, "sites" {pass: [site]}, "checkpoints", "decisions"
Wrapper = Literal["ddp", "fsdp2"]
# Each step's MLPs in chunks of this many tokens, where a step's budget (0 bytes) chunks them: a
# rank's half of a batch (2 rows of 10) runs in three chunks, the whole batch in five.
CHUNK_TOKENS = 8


def lora_llama(checkpointing: bool) -> nn.Module:
    """A 2-layer Llama with LoRA r=64 on all seven projections and non-zero B. Each layer's
    adapters (1.5 MB) exceed DDP's first gradient bucket (1 MiB), as a real model's do."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 1024}, num_key_value_heads=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, target_modules=LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; give it values so that every gradient is exercised
            nn.init.normal_(p, std=0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """``ROWS`` rows; in each half the first row's first two labels are -100 (a prompt) and the
    second row ends in ``PADS`` right-padding tokens: both halves hold as many labelled tokens."""
    ids = torch.randint(3, COMMON["vocab_size"], (ROWS, LENGTH), generator=torch.Generator().manual_seed(step))
    mask = torch.ones_like(ids)
    mask[1::2, LENGTH - PADS:] = 0
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0::2, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = ROWS // WORLD
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}


def train(model: nn.Module, runner: nn.Module, batches: list[dict[str, torch.Tensor]],
          global_loss: Callable[[torch.Tensor], torch.Tensor]) -> list[float]:
    """SGD on ``model``'s trainable parameters, a step per batch through ``runner`` (the model or its
    wrapper); the loss of each step as ``global_loss`` makes it from this process's."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    losses = []
    for inputs in batches:
        loss = runner(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(global_loss(loss.detach())))
    return losses


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (an FSDP2 shard is gathered: every rank must call this)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def outcome(model: nn.Module, losses: list[float], optimized: bool) -> Result:
    """The losses, the adapters, and for an optimized model where its rewrites run, how many
    layers the latest step ran through sloth_fx's checkpoint (kept or checkpointed) and its
    checkpointing decisions."""
    result: Result = {"losses": losses, "adapters": adapters(model), "sites": {}, "checkpoints": 0, "decisions": {}}
    if optimized:
        report = sloth_fx.report(model)
        result["sites"] = {name: sorted(report.sites(name)) for name in sloth_fx.available_passes()}
        result["checkpoints"] = sum(checkpointed_layers(text) for text in report.checkpointing.values())
        result["decisions"] = dict(report.checkpointing)
    return result


def checkpointed_layers(decision: str) -> int:
    """How many layers a step's decision text says ran through sloth_fx's checkpoint."""
    found = re.search(r"this forward (?:checkpointed (\d+) layers|ran (\d+) checkpointed layers)", decision)
    return int(found.group(1) or found.group(2)) if found else 0


@functools.lru_cache(maxsize=None)
def one_process(optimized: bool, checkpointing: bool) -> Result:
    """The reference: this process trains on the whole batch of every step."""
    model = lora_llama(checkpointing)
    if optimized:
        sloth_fx.optimize(model)
    return outcome(model, train(model, model, [global_batch(s) for s in range(STEPS)], lambda loss: loss), optimized)


def two_ranks(wrapper: Wrapper, checkpointing: bool, memory_budget: int | None = None) -> dict[str | None, Result]:
    """Rank 0's result for each of ``ORDERS``, trained under ``wrapper`` ("ddp" or "fsdp2") by two
    spawned processes, each on its half of every batch, optimized with ``memory_budget``."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rank0.pt"
        # a file store: no port to pick, none to collide with a concurrent test run
        args = (wrapper, checkpointing, memory_budget, f"file://{folder}/store", str(out))
        mp.spawn(_rank_main, args=args, nprocs=WORLD)
        return torch.load(out)


def _rank_main(rank: int, wrapper: Wrapper, checkpointing: bool, memory_budget: int | None, store: str,
               out: str) -> None:
    torch.set_num_threads(1)  # two processes on a machine of few cores
    token_chunks.CHUNK_TOKENS = CHUNK_TOKENS  # a spawned process: its own module state
    # a rank left waiting in a collective fails after the timeout instead of holding up the suite
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        results = {when: _train_on_rank(rank, wrapper, checkpointing, memory_budget, when) for when in ORDERS}
        if rank == 0:
            torch.save(results, out)
        # Tear down only when no rank has traffic in flight, and only after the models (FSDP2's
        # state holds cycles) are freed while the interpreter lives: gloo work still holding tensors
        # at interpreter exit aborts the process (seen once in CI: SIGABRT, "terminate called
        # without an active exception").
        dist.barrier()
        gc.collect()
    finally:
        dist.destroy_process_group()


def _train_on_rank(rank: int, wrapper: Wrapper, checkpointing: bool, memory_budget: int | None,
                   when: str | None) -> Result:
    model = lora_llama(checkpointing)
    if when == "before":
        sloth_fx.optimize(model, memory_budget=memory_budget)
    runner = _wrap(model, wrapper)
    if when == "after":
        sloth_fx.optimize(runner, memory_budget=memory_budget)
    losses = train(model, runner, [half(global_batch(s), rank) for s in range(STEPS)], _mean_over_ranks)
    return outcome(model, losses, when is not None)


def _wrap(model: nn.Module, wrapper: Wrapper) -> nn.Module:
    """``model`` under DDP, or sharded by FSDP2 a decoder layer at a time and then as a whole (the
    embeddings, the final norm and the head), as FSDP2's documentation does it."""
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp2":
        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        return fully_shard(model)
    raise ValueError(wrapper)


def _mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(loss)
    return loss / WORLD
