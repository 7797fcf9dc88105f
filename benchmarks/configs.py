"""The end-to-end configurations E1-E6 of ``shared/BENCHMARKS.md`` as data.

A :class:`Config` fixes everything that decides the work of one training step: the model's shape,
its precision (bf16 LoRA or nf4 QLoRA), batch x sequence, activation checkpointing and where the
batches come from (fixed random tokens, or the real-length source padded or packed).
LoRA is the same everywhere: r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LORA_R = 16
LORA_ALPHA = 16
LORA_DROPOUT = 0.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# sloth_fx_noce: sloth_fx without its fused lm_head + cross-entropy, the "before" of that pass.
# sloth_fx_offload: sloth_fx with every checkpointed step offloaded (memory_budget=0).
SYSTEMS = ("hf", "liger", "compile", "unsloth", "sloth_fx_noce", "sloth_fx", "sloth_fx_offload")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder; random weights, no download."""

    name: str
    family: str  # "llama" or "mistral": which transformers config/model class builds it
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA2_7B = ModelShape("Llama-2-7B", "llama", 4096, 32, 11008, 32, 32, 32000)
MISTRAL_7B = ModelShape("Mistral-7B", "mistral", 4096, 32, 14336, 32, 8, 32000, rope_theta=1e6, max_positions=32768)
LLAMA3_8B = ModelShape("Llama-3-8B", "llama", 4096, 32, 14336, 32, 8, 128256, rope_theta=5e5, max_positions=8192)
# A tiny shape of the same family for CPU tests and smoke runs.
TINY = ModelShape("tiny-llama", "llama", 64, 2, 176, 4, 2, 256, max_positions=512)


@dataclass(frozen=True)
class Config:
    """One end-to-end configuration.

    ``data`` is ``"random"`` (fixed random tokens, every row ``seq`` long), ``"padded"`` (real-length
    source, each batch padded to its longest row as HF's DataCollatorWithPadding does) or ``"packed"``
    (the same sequences concatenated into one row of at most ``batch*seq`` tokens, position_ids
    restarting per sequence, no padding).
    """

    id: str
    shape: ModelShape
    precision: str  # "bf16" (LoRA) or "nf4" (QLoRA)
    batch: int
    seq: int
    checkpointing: bool
    data: str = "random"
    note: str = ""

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "nf4"):
            raise ValueError(f"precision must be 'bf16' or 'nf4', got {self.precision!r}")
        if self.data not in ("random", "padded", "packed"):
            raise ValueError(f"data must be 'random', 'padded' or 'packed', got {self.data!r}")
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"batch and seq must be positive, got {self.batch}x{self.seq}")

    @property
    def tokens_per_step(self) -> int:
        """batch x seq: the tokens a step of fixed-length data holds (padding included)."""
        return self.batch * self.seq

    def replace(self, **changes: object) -> "Config":
        """A copy with fields changed; ``layers=`` changes the model's depth (smoke runs)."""
        layers = changes.pop("layers", None)
        cfg = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        if layers is not None:
            cfg = dataclasses.replace(cfg, shape=dataclasses.replace(cfg.shape, layers=int(layers)))
        return cfg

    def describe(self) -> str:
        ck = "ckpt" if self.checkpointing else "no ckpt"
        prec = "bf16 LoRA" if self.precision == "bf16" else "nf4 QLoRA"
        data = "" if self.data == "random" else f", real-length {self.data}"
        return f"{self.id} {self.shape.name} {prec} {self.batch}x{self.seq} {ck}{data}"


CONFIGS: dict[str, Config] = {
    c.id: c
    for c in [
        Config("E1", LLAMA2_7B, "bf16", 8, 2048, True),
        Config("E2", LLAMA2_7B, "bf16", 4, 1024, False),
        Config("E3", LLAMA2_7B, "nf4", 8, 2048, True),
        Config("E4", MISTRAL_7B, "bf16", 8, 2048, True),
        Config("E5", LLAMA3_8B, "bf16", 4, 4096, True),
        # E6: batch 1, seq found by maxlen.py's bisection; 2048 is only the starting probe.
        Config("E6", LLAMA2_7B, "nf4", 1, 2048, True, note="seq searched by `python -m benchmarks maxlen`"),
        # E6 on Llama-3-8B nf4 (issue 15 asks for both models): the same search, a 128k vocabulary.
        Config("E6L3", LLAMA3_8B, "nf4", 1, 2048, True, note="seq searched by `python -m benchmarks maxlen --config E6L3`"),
        # Real-length data (BENCHMARKS.md "Also one run on real-length data"): E1's model and
        # settings, batches of 8 sequences drawn from the instruction-length distribution.
        Config("R1", LLAMA2_7B, "bf16", 8, 2048, True, data="padded"),
        Config("R1p", LLAMA2_7B, "bf16", 8, 2048, True, data="packed"),
        # Smoke configurations: a 2-layer Llama-2-7B shape (GPU) and a tiny model (CPU tests).
        Config("S2", dataclasses.replace(LLAMA2_7B, layers=2), "bf16", 4, 1024, True),
        Config("S2q", dataclasses.replace(LLAMA2_7B, layers=2), "nf4", 4, 1024, True),
        Config("tiny", TINY, "bf16", 2, 32, False),
    ]
}


def get_config(name: str, **overrides: object) -> Config:
    """Look up a configuration by id, e.g. ``get_config("E2", layers=2)``."""
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}") from None
    changes = {k: v for k, v in overrides.items() if v is not None}
    if not changes:
        return cfg
    tag = ",".join(f"{k}={v}" for k, v in sorted(changes.items()))
    return cfg.replace(id=f"{cfg.id}[{tag}]", **changes)
