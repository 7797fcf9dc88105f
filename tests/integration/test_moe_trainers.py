"""Optimized tiny MoE models (Mixtral, Qwen3-MoE) with PEFT LoRA on attention and on the routed
experts under ``transformers.Trainer`` and TRL's ``SFTTrainer``: the un-optimized run's losses,
gradients and adapters, with the experts run by the fused op, and the router's load-balancing loss
(computed from router logits recorded by hooks inside the captured layers) in the loss as without
sloth_fx.

The models are tests/test_routed_experts.py's (LoRA through PEFT's ``target_parameters`` on the
experts' stacked ``gate_up_proj`` and ``down_proj``). transformers runs their experts in float32 by
``torch._grouped_mm``, whose rounding a few AdamW steps amplify past the kit's adapter tolerance on
near-zero gradient elements (a tiny Mixtral: one expert ``lora_B`` element 2.8% of a step from the
float64 run after 3 steps, the fused op's 0.5%): the saved adapters are judged against the
un-optimized model trained in float64, the first-step gradients and every logged loss against its
float32 run (``assert_same_training``'s ``exact``).
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager

import pytest
import torch
from test_routed_experts import moe_model
from tiny_models import twin
from trainer_kit import assert_same_training, text_dataset, token_dataset, tokenizer, trained
from transformers import Trainer, TrainingArguments

import sloth_fx
from sloth_fx.capture.unrewritten import UnrewrittenLayerWarning

ATTENTION_LORA = 8  # q, k, v, o of each of the two layers, rewritten in the layers' captures


@contextmanager
def no_unrewritten_warnings():
    """Fails if sloth_fx warned that a layer, or its routed experts (UnfusedExpertsWarning, a
    subclass), runs as transformers runs it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    unrewritten = [f"{w.category.__name__}: {w.message}" for w in caught
                   if issubclass(w.category, UnrewrittenLayerWarning)]
    assert unrewritten == [], unrewritten


def float64_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The un-optimized model in float64, its experts by transformers' eager loop (``grouped_mm``
    takes no float64): the reference that the float32 runs' rounding is measured from."""
    exact = twin(model).double()
    exact.set_experts_implementation("eager")
    return exact


def assert_experts_fused(model: torch.nn.Module, calls: int) -> str:
    """Explain names the fused op, with the experts' LoRA folded in, for every one of the ``calls``
    experts calls of each MoE layer region, none run as transformers runs them; explain's text."""
    text = sloth_fx.explain(model)
    fused = re.findall(r"routed experts mlp\.experts: fused op in (\d+) forward calls? \(4 experts, silu, "
                       r"LoRA folded in \(gate_up r=4, down r=4\)", text)
    assert fused == [str(calls)] and "as transformers runs them" not in text, text
    assert sloth_fx.report(model).count("lora") == ATTENTION_LORA, text
    return text


def train_with_trainer(model, tmp_path, arguments) -> Trainer:
    return trained(Trainer, TrainingArguments, model, tmp_path, arguments, train_dataset=token_dataset())


# Each family in each mode once by default (about 15 s a case on 2 cores, most of it Dynamo capturing
# the optimized model); the other two cases with -m full.
@pytest.mark.parametrize(("family", "checkpointing"), [
    ("mixtral", False),
    pytest.param("mixtral", True, marks=pytest.mark.full),
    pytest.param("qwen3_moe", False, marks=pytest.mark.full),
    ("qwen3_moe", True),
], ids=["mixtral-plain", "mixtral-checkpointing", "qwen3_moe-plain", "qwen3_moe-checkpointing"])
def test_trainer_on_moe_matches_the_unoptimized_run(family, checkpointing, tmp_path):
    """Trainer's defaults (the kit's steps, batch, seed), checkpointing enabled by Trainer or not:
    the optimized run applies the un-optimized run's first-step gradients, logs its losses and saves
    its adapters (attention and experts, judged against float64), its experts fused in every forward
    call (3 steps over 2 layers; the recompute runs them again, uncounted: torch stops it early,
    inside the experts' op), its layers checkpointed by sloth_fx when Trainer asks, nothing warned of."""
    arguments = {"gradient_checkpointing": checkpointing}
    original = moe_model(family, lora=True, checkpointing=False)
    optimized, exact = sloth_fx.optimize(twin(original)), float64_twin(original)  # before original trains
    reference = train_with_trainer(original, tmp_path, arguments)
    exact = train_with_trainer(exact, tmp_path, arguments)
    with no_unrewritten_warnings():
        run = train_with_trainer(optimized, tmp_path, arguments)
    assert_same_training(reference, run, tmp_path, exact=exact)
    text = assert_experts_fused(optimized, calls=3 * 2)
    if checkpointing:
        assert "activation checkpointing, recompute (latest)" in text, text
        assert "this forward checkpointed 2 layers through sloth_fx's checkpoint" in text, text
    else:
        assert "activation checkpointing, none (latest)" in text, text


@pytest.mark.parametrize("arguments", [{}, {"padding_free": True, "max_length": None}], ids=["plain", "padding_free"])
def test_sft_on_moe_matches_the_unoptimized_run(arguments, tmp_path):
    """SFTTrainer on ragged rows of 4 to 11 words, padded or padding-free (one row of a batch's
    tokens, position ids restarting at each): the un-optimized run's losses and adapters, the
    experts fused. A float32 base under bf16=False, as tests/integration/test_sft.py runs it."""
    trl = pytest.importorskip("trl")
    arguments = {"bf16": False, **arguments}
    original = moe_model("qwen3_moe", lora=True, checkpointing=False)
    optimized, exact = sloth_fx.optimize(twin(original)), float64_twin(original)  # before original trains
    data = dict(train_dataset=text_dataset(), processing_class=tokenizer())
    reference = trained(trl.SFTTrainer, trl.SFTConfig, original, tmp_path, arguments, **data)
    exact = trained(trl.SFTTrainer, trl.SFTConfig, exact, tmp_path, arguments, **data)
    with no_unrewritten_warnings():
        run = trained(trl.SFTTrainer, trl.SFTConfig, optimized, tmp_path, arguments, **data)
    assert_same_training(reference, run, tmp_path, exact=exact)
    assert_experts_fused(optimized, calls=3 * 2)
    batch = next(iter(run.get_train_dataloader()))
    if arguments.get("padding_free"):  # the batch's rows in one, no padding: what the case is about
        assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch, batch
    else:
        assert (batch["input_ids"] == tokenizer().pad_token_id).any(), batch  # ragged rows, padded


def test_trainer_loss_with_the_routers_load_balancing_loss_matches_the_unoptimized_run(tmp_path):
    """``output_router_logits=True``: the model adds ``router_aux_loss_coef`` times the
    load-balancing loss of the router logits that transformers' hooks record inside each layer
    (captured by sloth_fx, the experts fused outside it). Trainer's losses and gradients are the
    un-optimized run's; the coefficient is raised so that the auxiliary loss weighs on them well
    beyond the tolerance (checked on the first batch: without it, the loss would be off by more)."""
    # The recording hooks read a ContextVar, which Dynamo does not trace: the layers' capture also
    # breaks at them (this Mixtral's layers captured 10 times over the run, not 5); the numbers hold.
    original = moe_model("mixtral", lora=True, checkpointing=False)
    original.config.output_router_logits = True
    original.config.router_aux_loss_coef = 0.1
    optimized, exact = sloth_fx.optimize(twin(original)), float64_twin(original)  # before original trains
    first = token_dataset()[:2]
    with torch.no_grad():
        out = original(**{k: torch.tensor(v) for k, v in first.items()})
    assert out.aux_loss is not None and 0.1 * out.aux_loss > 1e-3 * out.loss  # a hundred times the loss tolerance
    reference = train_with_trainer(original, tmp_path, {})
    exact = train_with_trainer(exact, tmp_path, {})
    with no_unrewritten_warnings():
        run = train_with_trainer(optimized, tmp_path, {})
    assert_same_training(reference, run, tmp_path, exact=exact)
    assert_experts_fused(optimized, calls=3 * 2)
