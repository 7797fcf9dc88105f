"""Every decoder layer captured and rewritten, on the transformers release installed (CI runs this
file under each release it supports: ``.ci/run``, ``.ci/stacks.txt``).

For each family and each mode (plain, PEFT LoRA on every linear projection, activation
checkpointing, LoRA with checkpointing and ``lora_dropout``), a tiny random-init model and its
optimized twin train two steps on short ragged batches, of other sizes at each step, with an SGD
update between them: right-padded rows (which sloth_fx packs padding-free), or with dropout rows
packed as DataCollatorWithFlattening packs them (padding-free packing draws dropout's masks over
other shapes than the padded model does), and

- the loss and every gradient are the original's, at both steps;
- every decoder layer ran a capture: each layer path of the region ran one, none runs unrewritten;
- every layer ran the rewrites its parts call for: each RMSNorm (Qwen3's and OLMo2's q_norm and
  k_norm included), q and k's rotary embedding, the gated MLP, one LoRA site per adapted
  projection, and the MLP's chunking outline; the final norm and the head's loss once.

Where a family's part cannot be rewritten, the test says what runs and asserts that ``explain``
gives the reason for what does not (see ``NOT_REWRITTEN``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from tiny_models import batch, loss_and_grads, tiny_model, twin

import sloth_fx

pytestmark = [pytest.mark.release, pytest.mark.usefixtures("reference_ops"),
              pytest.mark.filterwarnings("error::sloth_fx.capture.unrewritten.UnrewrittenLayerWarning")]


@dataclass(frozen=True)
class Parts:
    """What one decoder layer of a family holds, in rewrite sites per layer."""

    norms: int  # RMSNorms (each is one rmsnorm site)
    projections: int  # linear projections, each adapted under LoRA (one lora site each)
    gated_mlp: int = 1  # the gated MLP (SwiGLU, or Gemma's tanh GeGLU)
    rope: int = 2  # q and k, rotated by one launch (two sites)
    chunked_mlp: int = 1  # the MLP outlined for token chunks


FAMILIES = {
    "llama": Parts(norms=2, projections=7),
    "mistral": Parts(norms=2, projections=7),
    "qwen2": Parts(norms=2, projections=7),  # q, k and v with a bias
    "qwen3": Parts(norms=4, projections=7),  # + q_norm, k_norm per head
    "gemma": Parts(norms=2, projections=7),  # 1 + w norms, tanh GeGLU
    # qkv_proj, o_proj, gate_up_proj, down_proj. The MLP's gate and up are the halves of one
    # linear's output (chunk): the gated_mlp pass takes them, the chunked_mlp outline does not.
    "phi3": Parts(norms=2, projections=4, chunked_mlp=0),
    "olmo2": Parts(norms=4, projections=7),  # norms after attention and MLP, q_norm and k_norm over all heads
}

# Parts that a family's layers run unrewritten: the pass and the part, which explain must name with
# a reason. Phi-3's MLP is not outlined for token chunks (transformers 5.0-5.25: "only down_proj of
# the MLP in this graph"): a step that would chunk runs it whole.
NOT_REWRITTEN = {
    "phi3": [("chunked_mlp", "mlp")],
}

MODES = {  # name: (lora, checkpointing, lora_dropout)
    "plain": (False, False, 0.0),
    "lora": (True, False, 0.0),
    "checkpointing": (False, True, 0.0),
    "lora_checkpointing": (True, True, 0.1),
}


def padded_rows(lengths: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of ``lengths`` real tokens, an ignored label inside the first sequence."""
    inputs = batch(b=len(lengths), s=max(lengths), seed=seed)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    inputs["labels"][0, 3] = -100
    return {**inputs, "attention_mask": mask, "labels": inputs["labels"].masked_fill(mask == 0, -100)}


def packed_row(lengths: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Sequences of ``lengths`` in one row, as DataCollatorWithFlattening makes it."""
    inputs = batch(b=1, s=sum(lengths), seed=seed)
    inputs["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    inputs["labels"] = inputs["input_ids"].clone()
    inputs["labels"][0, starts] = -100
    return inputs


def layer_paths(model: torch.nn.Module) -> tuple[str, list[str]]:
    """The decoder layers' class name (their region's name) and module paths."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(base.get_decoder().layers)
    paths = [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    assert len(paths) == len(layers) == 2
    return type(layers[0]).__name__, paths


def sgd_step(model: torch.nn.Module, grads: dict[str, torch.Tensor], lr: float = 0.1) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in grads:
                p -= lr * grads[name]


def assert_every_layer_captured(optimized: torch.nn.Module, text: str) -> None:
    assert "runs unrewritten" not in text, text
    region_name, paths = layer_paths(optimized)
    report = sloth_fx.report(optimized)
    region = report.regions[region_name]
    assert region.modules == paths
    assert all(region.current.get(path) for path in paths), (region.current, text)
    assert not region.eager, region.eager
    for other in report.regions.values():  # the final norm and the head+loss too
        assert all(other.current.get(path) for path in other.modules), (other.name, other.current, text)


def assert_rewrites(optimized: torch.nn.Module, family: str, lora: bool, text: str) -> None:
    parts = FAMILIES[family]
    _, paths = layer_paths(optimized)
    report = sloth_fx.report(optimized)
    per_layer = {"rmsnorm": parts.norms, "rope": parts.rope, "gated_mlp": parts.gated_mlp,
                 "lora": parts.projections if lora else 0, "chunked_mlp": parts.chunked_mlp}
    for pass_name, n in per_layer.items():
        sites = report.sites(pass_name)
        for path in paths:
            in_layer = [s for s in sites if s.startswith(path + ".")]
            assert len(in_layer) == n, (pass_name, path, in_layer, text)
    totals = {name: report.count(name) for name in (*per_layer, "cross_entropy")}
    expected = {name: n * len(paths) for name, n in per_layer.items()}
    expected["rmsnorm"] += 1  # the final norm
    expected["cross_entropy"] = 1
    assert totals == expected, text
    for pass_name, part in NOT_REWRITTEN.get(family, []):
        assert re.search(rf"^ +{pass_name}: refused {re.escape(part)}: \S", text, re.M), (pass_name, part, text)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layer_is_captured_and_rewritten(family: str, mode: str) -> None:
    lora, checkpointing, dropout = MODES[mode]
    original = tiny_model(family, lora=lora, checkpointing=checkpointing, lora_dropout=dropout)
    optimized = sloth_fx.optimize(twin(original))
    if lora:  # every linear projection of the layers is adapted
        adapted = {n.rsplit(".", 1)[0] for n, _ in original.named_parameters() if "lora_A" in n}
        assert len(adapted) == FAMILIES[family].projections * 2, sorted(adapted)
    # padding-free packing draws dropout's masks over the packed row, not over the padded batch
    # the second step's longest sequence is the first's: it runs the same captures, over other shapes
    # (a new longest length is one more capture, seconds of Dynamo on CPU)
    steps = ([packed_row((4, 7, 3), seed=12), packed_row((7, 2, 5, 3), seed=13)] if dropout else
             [padded_rows((9, 6, 2), seed=11), padded_rows((4, 9), seed=12)])
    for step, inputs in enumerate(steps):
        torch.manual_seed(step)
        loss_ref, grads_ref = loss_and_grads(original, inputs)
        torch.manual_seed(step)
        loss, grads = loss_and_grads(optimized, inputs)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
        assert grads.keys() == grads_ref.keys() and grads
        for name in grads_ref:
            torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {step}, {name}: {m}")
        text = sloth_fx.explain(optimized)
        assert_every_layer_captured(optimized, text)
        assert_rewrites(optimized, family, lora, text)
        sgd_step(original, grads_ref)
        sgd_step(optimized, grads)
    if dropout:  # the masks are really drawn: another seed gives another loss
        torch.manual_seed(5)
        first = optimized(**steps[0]).loss
        torch.manual_seed(6)
        assert not torch.equal(first, optimized(**steps[0]).loss)

