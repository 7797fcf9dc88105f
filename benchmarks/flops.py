"""Useful FLOPs of one LoRA training step, counted from the model's shape.

What is counted (and only this):

* ``N`` = the base model's parameters excluding the input embedding table: per decoder layer the
  q, k, v, o projections (``H*H + 2*H*Hkv*D + H*H``), the gate, up and down projections
  (``3*H*I``) and the two RMSNorm weights (``2*H``); plus the final norm (``H``) and the lm_head
  (``V*H``). The LoRA adapters are not in ``N`` (r=16 adds ~0.6% to a 7B model's matmul work and
  is left out, as the tied-weights/embedding look-up is).
* forward: ``2*N*T``; input gradients in backward: ``2*N*T`` (the base weights are frozen, so no
  weight-gradient FLOPs are counted); recompute under activation checkpointing: ``2*N_layers*T``
  where ``N_layers`` is the decoder layers' part of ``N`` (HF checkpoints the layers, not the
  final norm or the head).
* attention, per layer and per sequence of length ``s`` (causal, only the lower triangle is
  useful): ``Q K^T`` and ``P V`` take ``Hq*D*s*(s+1)`` FLOPs each, so forward is
  ``2*Hq*D*s*(s+1)``; backward is twice forward (four products); checkpointing adds one forward.
* ``T`` counts real tokens only: padding is not useful work.

Softmax, norms, activations, rotary and the loss's elementwise work are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.configs import ModelShape


def layer_params(shape: ModelShape) -> int:
    """Parameters of one decoder layer (projections and the two norm weights)."""
    h, d = shape.hidden, shape.head_dim
    attn = h * shape.heads * d + 2 * h * shape.kv_heads * d + shape.heads * d * h
    mlp = 3 * h * shape.intermediate
    return attn + mlp + 2 * h


def non_embedding_params(shape: ModelShape) -> int:
    """``N``: every parameter of the base model except the input embedding table."""
    return shape.layers * layer_params(shape) + shape.hidden + shape.vocab * shape.hidden


def attention_flops_forward(shape: ModelShape, lengths: Sequence[int]) -> int:
    """Causal attention's forward FLOPs over all layers for sequences of the given lengths."""
    per_layer = sum(2 * shape.heads * shape.head_dim * s * (s + 1) for s in lengths)
    return shape.layers * per_layer


def step_flops(shape: ModelShape, lengths: Sequence[int], checkpointing: bool) -> dict[str, int]:
    """The useful FLOPs of one training step, by part, and their ``total``."""
    t = int(sum(lengths))
    n = non_embedding_params(shape)
    n_layers = shape.layers * layer_params(shape)
    attn_f = attention_flops_forward(shape, lengths)
    parts = {
        "forward": 2 * n * t,
        "input_grad": 2 * n * t,
        "recompute": 2 * n_layers * t if checkpointing else 0,
        "attention": attn_f * (3 + (1 if checkpointing else 0)),
    }
    parts["total"] = sum(parts.values())
    return parts
