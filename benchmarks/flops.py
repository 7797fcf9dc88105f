"""Useful FLOPs of one LoRA training step, counted from the model's shape.

What is counted (and only this):

* ``N`` = the parameters a token's matmuls go through, excluding the input embedding table: per
  decoder layer the q, k, v, o projections (``H*Hq*D + 2*H*Hkv*D + Hq*D*H``), the gate, up and down
  projections (``3*H*I``) and the two RMSNorm weights (``2*H``); plus the final norm (``H``) and the
  lm_head (``V*H``). The LoRA adapters are not in ``N`` (r=16 adds ~0.6% to a 7B model's matmul
  work and is left out, as the tied-weights/embedding look-up is).
* MoE layers (:class:`benchmarks.configs.MoEShape`): a token goes through its ``k`` routed experts
  only, so the MLP's part of ``N`` is the router (``E*H``: its logits are a matmul every token
  pays) plus ``k`` experts' gate, up and down (``3*H*I_moe`` each), not all ``E`` experts'
  (:func:`layer_active_params`; :func:`layer_params` is what the layer stores). Qwen3-MoE's
  q/k norms (``2*D``) count as the other norms do. PEFT's merged expert weights (base + the LoRA
  product of every expert, formed each forward) are LoRA work and not counted.
* forward: ``2*N*T``; input gradients in backward: ``2*N*T`` (the base weights are frozen, so no
  weight-gradient FLOPs are counted); recompute under activation checkpointing: ``2*N_layers*T``
  where ``N_layers`` is the decoder layers' part of ``N`` (HF checkpoints the layers, not the
  final norm or the head).
* attention, per layer and per sequence of length ``s`` (causal, only the lower triangle is
  useful): ``Q K^T`` and ``P V`` take ``Hq*D*s*(s+1)`` FLOPs each, so forward is
  ``2*Hq*D*s*(s+1)``; backward is twice forward (four products); checkpointing adds one forward.
* ``T`` counts real tokens only: padding is not useful work.

Softmax, norms, activations, rotary, the router's top-k and the loss's elementwise work are not
counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.configs import ModelShape


def attention_params(shape: ModelShape) -> int:
    """q, k, v, o of one layer (and Qwen3-MoE's per-head q/k norms)."""
    h, d = shape.hidden, shape.head_dim
    qk_norms = 2 * d if shape.family == "qwen3_moe" else 0
    return h * shape.heads * d + 2 * h * shape.kv_heads * d + shape.heads * d * h + qk_norms


def mlp_params(shape: ModelShape, active: bool) -> int:
    """The MLP of one layer: a dense SwiGLU's ``3*H*I``; an MoE's router ``E*H`` plus its experts,
    all ``E`` of them as stored, or the ``k`` a token is routed to (``active``)."""
    h = shape.hidden
    if not shape.is_moe:
        return 3 * h * shape.intermediate
    experts = shape.experts_per_token if active else shape.experts  # type: ignore[attr-defined]
    return shape.experts * h + experts * 3 * h * shape.moe_intermediate  # type: ignore[attr-defined]


def layer_params(shape: ModelShape) -> int:
    """Parameters of one decoder layer as stored (projections, every expert, router, norm weights)."""
    return attention_params(shape) + mlp_params(shape, active=False) + 2 * shape.hidden


def layer_active_params(shape: ModelShape) -> int:
    """Parameters of one decoder layer a token's matmuls go through (an MoE layer: its ``k``
    experts and the router; a dense layer: all of it)."""
    return attention_params(shape) + mlp_params(shape, active=True) + 2 * shape.hidden


def non_embedding_params(shape: ModelShape) -> int:
    """Every parameter of the base model as stored, except the input embedding table."""
    return shape.layers * layer_params(shape) + shape.hidden + shape.vocab * shape.hidden


def active_non_embedding_params(shape: ModelShape) -> int:
    """``N``: the parameters a token's matmuls go through, except the input embedding table
    (equals :func:`non_embedding_params` for a dense model)."""
    return shape.layers * layer_active_params(shape) + shape.hidden + shape.vocab * shape.hidden


def attention_flops_forward(shape: ModelShape, lengths: Sequence[int]) -> int:
    """Causal attention's forward FLOPs over all layers for sequences of the given lengths."""
    per_layer = sum(2 * shape.heads * shape.head_dim * s * (s + 1) for s in lengths)
    return shape.layers * per_layer


def step_flops(shape: ModelShape, lengths: Sequence[int], checkpointing: bool) -> dict[str, int]:
    """The useful FLOPs of one training step, by part, and their ``total``."""
    t = int(sum(lengths))
    n = active_non_embedding_params(shape)
    n_layers = shape.layers * layer_active_params(shape)
    attn_f = attention_flops_forward(shape, lengths)
    parts = {
        "forward": 2 * n * t,
        "input_grad": 2 * n * t,
        "recompute": 2 * n_layers * t if checkpointing else 0,
        "attention": attn_f * (3 + (1 if checkpointing else 0)),
    }
    parts["total"] = sum(parts.values())
    return parts
