"""The end-to-end configurations E1-E6 of ``shared/BENCHMARKS.md``, and the MoE ones M1-M2, as data.

A :class:`Config` fixes everything that decides the work of one training step: the model's shape,
its precision (bf16 LoRA or nf4 QLoRA), batch x sequence, activation checkpointing and where the
batches come from (fixed random tokens, or the real-length source padded or packed).
LoRA is the same everywhere: r=16, alpha=16, dropout 0, on q,k,v,o,gate,up,down of a dense model;
on q,k,v,o and the routed experts' stacked weights (PEFT's ``target_parameters``) of an MoE model,
whose router stays frozen (:func:`lora_targets`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

LORA_R = 16
LORA_ALPHA = 16
LORA_DROPOUT = 0.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# MoE models: attention's projections as modules, the routed experts' 3-D weights as parameters
# (transformers 5 stacks every expert of a layer in ``mlp.experts.gate_up_proj`` [E, 2I, H] and
# ``mlp.experts.down_proj`` [E, H, I]; PEFT's ParamWrapper puts one LoRA pair per expert on each).
LORA_MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# sloth_fx_noce: sloth_fx without its fused lm_head + cross-entropy, the "before" of that pass.
# sloth_fx_offload: sloth_fx with every checkpointed step offloaded (memory_budget=0).
SYSTEMS = ("hf", "liger", "compile", "unsloth", "sloth_fx_noce", "sloth_fx", "sloth_fx_offload")


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-family decoder; random weights, no download.

    ``full_layers`` is the depth of the model the shape is named after where ``layers`` keeps fewer
    (a depth cut so that the model fits the GPU): :meth:`Config.describe` says so. ``attn_head_dim``
    is the width of a head where it is not ``hidden // heads`` (Qwen3-MoE: 32 heads of 128 on a
    hidden size of 2048)."""

    name: str
    family: str  # "llama", "mistral" (dense) or "qwen3_moe", "mixtral" (MoEShape)
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    max_positions: int = 4096
    rms_norm_eps: float = 1e-5
    attn_head_dim: int | None = None
    full_layers: int | None = None

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return False

    @property
    def depth(self) -> str:
        """``"24 of 48 layers"`` where the depth was cut, else ``""``."""
        return f"{self.layers} of {self.full_layers} layers" if self.full_layers and self.full_layers != self.layers else ""


MOE_FAMILIES = ("qwen3_moe", "mixtral")


@dataclass(frozen=True, kw_only=True)
class MoEShape(ModelShape):
    """A decoder whose every layer's MLP is a routed mixture of experts: ``experts`` SwiGLU experts
    of width ``moe_intermediate``, ``experts_per_token`` of them (top-k of a linear router's softmax)
    per token, their outputs weighted by the router's probabilities (renormalised over the top-k
    where ``norm_topk_prob``). ``intermediate`` is the dense MLP's width, which Qwen3-MoE has (for
    ``mlp_only_layers``; none here, every layer is sparse) and Mixtral has not (it must equal
    ``moe_intermediate``). No router auxiliary loss: the loss is the language-modelling loss alone."""

    experts: int
    experts_per_token: int
    moe_intermediate: int
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        if self.family not in MOE_FAMILIES:
            raise ValueError(f"an MoE shape's family is one of {MOE_FAMILIES}, got {self.family!r}")
        if not 0 < self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token must be in 1..{self.experts}, got {self.experts_per_token}")
        if self.family == "mixtral" and self.intermediate != self.moe_intermediate:
            raise ValueError("Mixtral has one MLP width: intermediate must equal moe_intermediate")

    @property
    def is_moe(self) -> bool:
        return True


def lora_targets(shape: ModelShape) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(target_modules, target_parameters)`` of the LoRA on ``shape``: the seven projections of a
    dense model; attention's four and the experts' two stacked weights of an MoE model (its router,
    ``mlp.gate``, stays frozen: it is neither an ``nn.Linear`` named in the list nor a parameter of it)."""
    if shape.is_moe:
        return LORA_MOE_TARGETS, LORA_EXPERT_PARAMETERS
    return LORA_TARGETS, ()


LLAMA2_7B = ModelShape("Llama-2-7B", "llama", 4096, 32, 11008, 32, 32, 32000)
MISTRAL_7B = ModelShape("Mistral-7B", "mistral", 4096, 32, 14336, 32, 8, 32000, rope_theta=1e6, max_positions=32768)
LLAMA3_8B = ModelShape("Llama-3-8B", "llama", 4096, 32, 14336, 32, 8, 128256, rope_theta=5e5, max_positions=8192)
# A tiny shape of the same family for CPU tests and smoke runs.
TINY = ModelShape("tiny-llama", "llama", 64, 2, 176, 4, 2, 256, max_positions=512)

# Qwen3-30B-A3B (its config.json): 48 layers, 128 experts of 768, 8 a token, 32 heads of 128 on a
# hidden size of 2048, 4 KV heads, 151936 tokens, top-k probabilities renormalised. M1 keeps 24 of
# its 48 layers: the whole model's bf16 weights (30.5B parameters, ~61 GB) and HF's fp32 logits at
# ~16k tokens (~33 GiB of loss at its peak) do not fit 80 GB together (M1's note has the sums).
QWEN3_30B_A3B = MoEShape(
    "Qwen3-30B-A3B", "qwen3_moe", 2048, 48, 6144, 32, 4, 151936, rope_theta=1e6, max_positions=40960,
    rms_norm_eps=1e-6, attn_head_dim=128, experts=128, experts_per_token=8, moe_intermediate=768,
    norm_topk_prob=True,
)
# Mixtral-8x7B-v0.1 (its config.json): 32 layers, 8 experts of 14336, 2 a token, 32 heads, 8 KV.
MIXTRAL_8X7B = MoEShape(
    "Mixtral-8x7B", "mixtral", 4096, 32, 14336, 32, 8, 32000, rope_theta=1e6, max_positions=32768,
    experts=8, experts_per_token=2, moe_intermediate=14336,
)
# Tiny MoE shapes for CPU tests and smoke runs; tinymoe's heads are wider than hidden // heads,
# as Qwen3-30B-A3B's are.
TINY_MOE = MoEShape("tiny-qwen3-moe", "qwen3_moe", 64, 2, 96, 4, 2, 256, max_positions=512, rms_norm_eps=1e-6,
                    attn_head_dim=32, experts=8, experts_per_token=2, moe_intermediate=48, norm_topk_prob=True)
TINY_MIXTRAL = MoEShape("tiny-mixtral", "mixtral", 64, 2, 96, 4, 2, 256, max_positions=512,
                        experts=4, experts_per_token=2, moe_intermediate=96)

M1_SHAPE = dataclasses.replace(QWEN3_30B_A3B, layers=24, full_layers=QWEN3_30B_A3B.layers)
M2_SHAPE = dataclasses.replace(MIXTRAL_8X7B, layers=16, full_layers=MIXTRAL_8X7B.layers)
M1_NOTE = (
    "Qwen3-30B-A3B at 24 of its 48 layers (every layer alike: 128 experts, 8 a token), bf16 LoRA on "
    "q,k,v,o and on every expert's gate_up/down (PEFT target_parameters; router frozen). Depth cut so "
    "that it fits an 80 GB H100: 48 layers are 30.5B bf16 parameters (56.8 GiB) before HF's loss "
    "(~32.5 GiB at its peak for 16k tokens x 151936 logits: bf16 logits, their fp32 copy, log-softmax "
    "and its gradient); at 24 layers, ~15.6B parameters (29.0 GiB) + fp32 adapters and AdamW (~3.6 GiB) "
    "+ checkpointed layer inputs (1.5 GiB) + that peak: ~67 GiB estimated for hf. A step runs half the "
    "full model's layers and the whole head: its tokens/s is above what the full model's would be."
)
M2_NOTE = (
    "Mixtral-8x7B at 16 of its 32 layers, nf4 QLoRA as bitsandbytes through transformers does it: only "
    "nn.Linear is quantised, so q,k,v,o are 4-bit, while the experts (3-D nn.Parameters "
    "mlp.experts.gate_up_proj [8, 28672, 4096] and down_proj [8, 4096, 14336]), the router, the norms, "
    "the embedding and lm_head stay bf16. LoRA on q,k,v,o and on every expert's gate_up/down (PEFT "
    "target_parameters; router frozen). Depth cut so that it fits an 80 GB H100: the bf16 experts are "
    "2.62 GiB a layer (84 GiB for 32 layers); at 16 layers ~42.8 GiB of weights + adapters and AdamW "
    "(~1.3 GiB) + checkpointed inputs (2 GiB) + one layer's recompute and backward (~12 GiB: PEFT's "
    "merged expert weights and their gradient, 2.6 GiB each, and 32k routed rows of activations): "
    "~59 GiB estimated for hf. A step runs half the full model's layers: its tokens/s is above what the full "
    "model's would be."
)

M2Q_NOTE = (
    "M2 with the experts' stacks nf4 as well (sloth_fx.quantize_experts after get_peft_model: double "
    "quantization, blocks of 64, each block within one expert): 0.68 GiB a layer instead of 2.62. hf "
    "trains them through the experts' own forward with the stacks dequantized for each call (the "
    "forward quantize_experts installs), PEFT's LoRA merged into the dense stack as without 4-bit; "
    "sloth_fx's fused op dequantizes a stack for each grouped product that reads it."
)


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
    experts: str = "bf16"  # an MoE model's expert stacks: "bf16", or "nf4" by sloth_fx.quantize_experts

    def __post_init__(self) -> None:
        if self.precision not in ("bf16", "nf4"):
            raise ValueError(f"precision must be 'bf16' or 'nf4', got {self.precision!r}")
        if self.experts not in ("bf16", "nf4") or (self.experts == "nf4" and not self.shape.is_moe):
            raise ValueError(f"experts must be 'bf16', or 'nf4' on an MoE shape, got {self.experts!r} "
                             f"on {self.shape.name}")
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
        if self.shape.is_moe:
            prec += f" (attn nf4, experts {self.experts})" if self.precision == "nf4" else ""
            prec += " on attn+experts"
        depth = f" ({self.shape.depth})" if self.shape.depth else ""
        data = "" if self.data == "random" else f", real-length {self.data}"
        return f"{self.id} {self.shape.name}{depth} {prec} {self.batch}x{self.seq} {ck}{data}"


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
        # MoE: ~16k tokens a step, LoRA on attention and the experts, each at a
        # reduced depth that fits an 80 GB H100 (the notes say why and what the estimate is).
        # M1p/M2p: packed real-length rows of 48 sequences (at most 4096 tokens each): ~13k real
        # tokens a step on average, none of the first eight steps over ~16.3k (seed 0).
        Config("M1", M1_SHAPE, "bf16", 4, 4096, True, note=M1_NOTE),
        Config("M1p", M1_SHAPE, "bf16", 48, 4096, True, data="packed", note=M1_NOTE),
        Config("M2", M2_SHAPE, "nf4", 4, 4096, True, note=M2_NOTE),
        Config("M2p", M2_SHAPE, "nf4", 48, 4096, True, data="packed", note=M2_NOTE),
        # M2 with the experts 4-bit too (sloth_fx.quantize_experts after LoRA): what QLoRA of the
        # whole model takes. hf runs them through the experts' own forward on stacks dequantized
        # for each call (what quantize_experts installs); Unsloth's load_in_4bit quantizes them itself.
        Config("M2q", M2_SHAPE, "nf4", 4, 4096, True, note=M2Q_NOTE, experts="nf4"),
        Config("M2qp", M2_SHAPE, "nf4", 48, 4096, True, data="packed", note=M2Q_NOTE, experts="nf4"),
        Config("tinymoe", TINY_MOE, "bf16", 2, 32, False),
        Config("tinymixtral", TINY_MIXTRAL, "bf16", 2, 32, False),
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
