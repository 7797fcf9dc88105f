"""How each row of the table prepares its model: hf, liger, compile, sloth_fx, sloth_fx_noce,
sloth_fx_offload, unsloth.

Every system starts from the same random-init weights (configs + seed), gets the same LoRA
(r=16, alpha=16, dropout 0, seven projections; on an MoE model attention's four and the routed
experts' stacked weights, ``configs.lora_targets``) and the same AdamW over the adapters. Imports of
the peers are lazy: a peer that is not installed, or that has nothing for a model family
(:class:`Unsupported`), fails its own row (in its own subprocess) with the reason, not the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.configs import LORA_ALPHA, LORA_DROPOUT, LORA_R, SYSTEMS, Config, ModelShape, lora_targets
from benchmarks.models import add_lora, base_model_for, build_base_model, decoder_layers, make_optimizer


@dataclass
class Prepared:
    """A model ready to train, its optimizer, and what the system reported while preparing it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    notes: dict[str, Any] = field(default_factory=dict)
    # Whether the model takes packed input (position_ids restarting per sequence, no mask).
    packed_ok: bool = True
    # Notes only training can give (sloth_fx captures and rewrites at the first step).
    after_training: Callable[[], dict[str, Any]] | None = None


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


class Unsupported(RuntimeError):
    """A system cannot run a configuration at all (the row says why)."""


def prepare(system: str, cfg: Config, device: torch.device | str, seed: int, **opts: Any) -> Prepared:
    """Build the model of ``cfg`` the way ``system`` would train it."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    prepare_fn = {
        "hf": _hf, "liger": _liger, "compile": _compile, "sloth_fx": _sloth_fx, "sloth_fx_noce": _sloth_fx_noce,
        "sloth_fx_offload": _sloth_fx_offload, "unsloth": _unsloth,
    }[system]
    return prepare_fn(cfg, device, seed, **opts)


def _finish(model: nn.Module, notes: dict[str, Any] | None = None) -> Prepared:
    return Prepared(model, make_optimizer(model), {**moe_notes(model), **(notes or {})})


def moe_notes(model: nn.Module) -> dict[str, Any]:
    """For an MoE model, how its experts run (transformers' ``experts_implementation``: ``eager``
    loops over the experts, ``grouped_mm`` runs them as grouped GEMMs) and which parameters LoRA
    wraps (PEFT's ParamWrapper on the 3-D expert stacks); nothing for a dense model."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(m, "config", None)
    if not (getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)):
        return {}
    peft_cfg = getattr(model, "peft_config", {}).get("default")
    return {
        "experts_implementation": getattr(cfg, "_experts_implementation", None),
        "lora_target_parameters": sorted(getattr(peft_cfg, "target_parameters", None) or []),
    }


def experts_quantized(model: nn.Module, shape: ModelShape) -> bool:
    """Whether ``model``'s routed experts hold under half the bytes of their bf16 stacks (``E·3·H·I``
    values a layer, LoRA's factors aside): quantized, however a loader stores them."""
    held = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if ".experts." in name and "lora_" not in name)
    dense = shape.layers * shape.experts * 3 * shape.hidden * shape.moe_intermediate * 2  # type: ignore[attr-defined]
    return held < dense / 2


def _hf(cfg: Config, device: torch.device | str, seed: int, **_: Any) -> Prepared:
    """transformers + peft as a user runs it: sdpa attention, nothing patched."""
    return _finish(add_lora(base_model_for(cfg, device, seed), seed, cfg))


# Liger's patch per family (its 0.8.5 has all four; a family it lacks fails the row as unsupported).
LIGER_APPLY = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
               "qwen3_moe": "apply_liger_kernel_to_qwen3_moe", "mixtral": "apply_liger_kernel_to_mixtral"}


def _liger(cfg: Config, device: torch.device | str, seed: int, **_: Any) -> Prepared:
    """Liger Kernel's rope, rms_norm, swiglu and fused linear cross-entropy, applied to the
    model instance (its norms and MLPs are swapped, its forward replaced) before LoRA goes on."""
    import liger_kernel.transformers as liger

    name = LIGER_APPLY.get(cfg.shape.family)
    apply = getattr(liger, name, None) if name else None
    if apply is None:
        raise Unsupported(f"liger-kernel {_version('liger-kernel')} has no "
                          f"{name or 'apply_liger_kernel_to_<family>'} for the {cfg.shape.family} family")
    base = base_model_for(cfg, device, seed)
    # On an MoE model (transformers 5) swiglu=True swaps the experts' forward for LigerExperts, its
    # fused MoE op over the same 3-D weights, which PEFT's ParamWrapper still parametrises.
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=base)
    return _finish(add_lora(base, seed, cfg), {"liger_kernel": _version("liger-kernel")})


def _compile(cfg: Config, device: torch.device | str, seed: int, **_: Any) -> Prepared:
    """torch.compile on each decoder layer (regional compilation: ``layer.compile()``)."""
    model = add_lora(base_model_for(cfg, device, seed), seed, cfg)
    for layer in decoder_layers(model):
        layer.compile()
    return _finish(model, {"compiled_layers": len(decoder_layers(model))})


def _sloth_fx(
    cfg: Config, device: torch.device | str, seed: int, passes: list[str] | None = None,
    memory_budget: int | None = None, **_: Any
) -> Prepared:
    """``sloth_fx.optimize(model, passes, memory_budget=...)`` on the PEFT model (``None``: every
    available pass, the free GPU memory as budget); the passes go into the notes, and once trained,
    the rewrites per pass and ``sloth_fx.explain``."""
    import sloth_fx

    model = sloth_fx.optimize(add_lora(base_model_for(cfg, device, seed), seed, cfg), passes=passes,
                              memory_budget=memory_budget)
    passes = passes if passes is not None else sloth_fx.available_passes()

    def report() -> dict[str, Any]:
        rewrites = sloth_fx.report(model)
        return {"rewrites": {p: rewrites.count(p) for p in passes}, "explain": str(sloth_fx.explain(model))[:16000]}

    prepared = _finish(model, {"passes": passes})
    prepared.after_training = report
    return prepared


def _sloth_fx_noce(cfg: Config, device: torch.device | str, seed: int, **_: Any) -> Prepared:
    """sloth_fx with every available pass except ``cross_entropy``: HF's lm_head and loss stay as
    they are (the before of that pass, beside ``sloth_fx`` as its after)."""
    import sloth_fx

    passes = [p for p in sloth_fx.available_passes() if p != "cross_entropy"]
    return _sloth_fx(cfg, device, seed, passes=passes)


def _sloth_fx_offload(cfg: Config, device: torch.device | str, seed: int, **_: Any) -> Prepared:
    """sloth_fx with a memory budget of 0 bytes: every checkpointed step offloads its layers'
    inputs to pinned host memory and prefetches them for backward (beside ``sloth_fx``: what the
    offload costs where it was not needed). Without ``chunked_mlp``, which such a budget would
    also have run over chunks of tokens in every step: the row measures the offload alone."""
    import sloth_fx

    passes = [p for p in sloth_fx.available_passes() if p != "chunked_mlp"]
    return _sloth_fx(cfg, device, seed, passes=passes, memory_budget=0)


# ---------------------------------------------------------------------------------------- unsloth


def save_random_init(shape: ModelShape, seed: int, root: str | Path, device: torch.device | str) -> Path:
    """Save the random-init bf16 model of ``shape``/``seed`` with ``save_pretrained`` under
    ``root`` beside a ``tokenizers`` WordLevel tokenizer saved as a ``PreTrainedTokenizerFast``,
    so that loaders that want a model directory (Unsloth) read the very weights the other systems
    draw. Reused when already there (a ``.complete`` marker is written last)."""
    path = Path(root) / f"{shape.name}-L{shape.layers}-seed{seed}"
    if (path / ".complete").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    model = build_base_model(shape, device, seed, torch.bfloat16)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    save_wordlevel_tokenizer(shape.vocab, path)
    (path / ".complete").write_text("ok\n")
    return path


def save_wordlevel_tokenizer(vocab_size: int, path: str | Path) -> None:
    """A WordLevel tokenizer over ``vocab_size`` made-up tokens (0 pad, 1 bos, 2 eos, 3 unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(special)}
    vocab.update({f"t{i}": i for i in range(len(special), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))


def _unsloth(
    cfg: Config, device: torch.device | str, seed: int, unsloth_offload: bool = False, model_dir: str | None = None, **_: Any
) -> Prepared:
    """Unsloth's ``FastLanguageModel`` offline: the random-init model saved to local disk, loaded
    with ``local_files_only=True`` under ``HF_HUB_OFFLINE=1``, nf4 through its own
    ``load_in_4bit`` (which on an MoE model quantizes the experts' stacks too: so it runs the
    nf4-experts configurations, M2q and M2qp, and refuses M2 and M2p); LoRA through its
    ``get_peft_model``. Checkpointing: plain (``True``), or
    Unsloth's offloaded variant (``"unsloth"``) when ``unsloth_offload``. The worker imports
    unsloth before transformers (Unsloth patches at import)."""
    if cfg.shape.is_moe and cfg.precision == "nf4" and cfg.experts == "bf16":
        # its load_in_4bit quantizes the experts too (2026.10.9: M2's model 12.09 GiB, hf's 43.26)
        raise Unsupported("Unsloth's load_in_4bit makes the experts' stacks 4-bit too: its run of this model "
                          "is the nf4-experts configuration's (M2q, M2qp)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import unsloth  # noqa: F401  (first: it patches transformers/peft at import)
    from unsloth import FastLanguageModel

    root = model_dir or os.environ.get("SLOTH_BENCH_MODEL_DIR", "/tmp/sloth_bench_models")
    t0 = time.perf_counter()
    path = save_random_init(cfg.shape, seed, root, device)
    save_s = time.perf_counter() - t0
    model, _tok = FastLanguageModel.from_pretrained(
        model_name=str(path),
        max_seq_length=max(cfg.seq, 2048),
        dtype=torch.bfloat16,
        load_in_4bit=cfg.precision == "nf4",
        local_files_only=True,
    )
    ckpt: bool | str = ("unsloth" if unsloth_offload else True) if cfg.checkpointing else False
    modules, parameters = lora_targets(cfg.shape)
    # MoE: the experts' stacked weights go in as target_parameters, as to PEFT (Unsloth's
    # get_peft_model takes them); were they left out, Unsloth would pick its own expert targets.
    extra = {"target_parameters": list(parameters)} if parameters else {}
    model = FastLanguageModel.get_peft_model(
        model,
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(modules),
        bias="none",
        use_gradient_checkpointing=ckpt,
        random_state=seed + 1,
        **extra,
    )
    FastLanguageModel.for_training(model)
    if cfg.shape.is_moe and (cfg.experts == "nf4") != experts_quantized(model, cfg.shape):
        raise Unsupported(f"Unsloth's loader left the experts' stacks {'bf16' if cfg.experts == 'nf4' else '4-bit'}, "
                          f"where {cfg.id} has them {cfg.experts}")
    return _finish(model, {"unsloth": _version("unsloth"), "checkpointing": ckpt, "save_s": save_s})
