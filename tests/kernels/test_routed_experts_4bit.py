"""The routed-experts op over bitsandbytes 4-bit stacks (QLoRA experts) against the float64
reference computed from the dequantized stacks, and against the op on those dense stacks (the
same numbers, bit for bit: the op dequantizes, then computes as for dense ones).

Stacks are quantized here by bitsandbytes on CPU (nf4 and fp4, with and without double
quantization), also at shapes whose 4-bit blocks straddle experts (the op dequantizes the whole
stack: it does not care). Buffers are NaN-poisoned as in test_routed_experts_op.py.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_routed_experts_op import assert_matches, make_case, no_references, poisoned, projection, run  # noqa: F401

from sloth_fx.kernels.routed_experts import routed_experts, routed_experts_reference, routed_experts_supports
from sloth_fx.kernels.toolkit import dense_weight


def quantized(w: torch.Tensor, quant_type: str, double_quant: bool, **kwargs) -> torch.Tensor:
    """``w [E, out, in]`` as a bitsandbytes 4-bit stack on its device (quantized by ``.to``)."""
    return bnb.nn.Params4bit(w.contiguous(), quant_type=quant_type, compress_statistics=double_quant,
                             **{"requires_grad": False, **kwargs}).to(w.device)


def dequantized(case, w1: torch.Tensor, w2: torch.Tensor):
    """``case`` with the 4-bit stacks ``w1``, ``w2``, and with their dense dequantization (fresh
    leaves for both, so that each run's gradients are its own)."""
    def fresh(leaves):
        return [x.detach().clone().requires_grad_() for x in leaves]

    (hidden, index, weights, _, _, lora1, lora2), _ = case
    cases = []
    for a, b in ((w1, w2), (dense_weight(w1, hidden.dtype), dense_weight(w2, hidden.dtype))):
        h, w, *lora = fresh([hidden, weights, *(lora1 or ()), *(lora2 or ())])
        l1, l2 = (lora[:2] if lora1 else None), (lora[-2:] if lora2 else None)
        cases.append(((h, index, w, a, b, l1, l2), [h, w, *lora]))
    return cases


# (T, H, I, E, k, r1, r2, activation, every, quant_type, double_quant): odd expert and token counts,
# top-1 and top-2; 2I·H = 1920 and H·I = 960 are whole 64-blocks per expert, 58·45 and 45·29 are not
CASES = [
    (7, 24, 40, 3, 1, 1, 3, "silu", False, "nf4", True),
    (37, 45, 29, 5, 2, 3, 1, "gelu_tanh", True, "fp4", False),
    (13, 24, 40, 5, 2, None, 3, "silu", True, "nf4", False),
    (9, 45, 29, 3, 2, 2, None, "gelu", False, "fp4", True),
]


@pytest.mark.parametrize("t,h,i,e,k,r1,r2,activation,every,quant_type,double_quant", CASES)
def test_4bit_stacks_match_the_float64_reference_of_their_dequantization(t, h, i, e, k, r1, r2, activation, every,
                                                                         quant_type, double_quant, poisoned,
                                                                         monkeypatch):
    case = make_case(t, h, i, e, k, r1, r2, seed=t * e + k)
    w1, w2 = (quantized(w, quant_type, double_quant) for w in case[0][3:5])
    packed, dense = dequantized(case, w1, w2)
    d_out = torch.randn(t, h, generator=torch.Generator().manual_seed(k))
    ref = run(routed_experts_reference, dense, r1, r2, activation, d_out)
    no_references(monkeypatch)
    got = run(routed_experts, packed, r1, r2, activation, d_out)
    assert len(got[1]) == 2 + 2 * ((r1 is not None) + (r2 is not None))  # hidden, router, every LoRA factor
    assert_matches([got[0], *got[1]], [ref[0], *ref[1]], rel=2e-5)
    on_dense = run(routed_experts, dense, r1, r2, activation, d_out)
    for g, want in zip([got[0], *got[1]], [on_dense[0], *on_dense[1]]):
        assert torch.equal(g, want)
    assert w1.grad is None and w2.grad is None and not w1.requires_grad


def test_the_4bit_stack_is_kept_for_backward_and_never_its_dense_copy(poisoned):
    case = make_case(7, 24, 40, 3, 2, 1, 1, seed=2)
    w1, w2 = (quantized(w, "nf4", True) for w in case[0][3:5])
    (hidden, index, weights, _, _, lora1, lora2), _ = dequantized(case, w1, w2)[0]
    out = routed_experts(hidden, index, weights, projection(w1, lora1, 1, 0.5), projection(w2, lora2, 1, 2.0), "silu")
    shapes = {tuple(w.quant_state.shape) for w in (w1, w2)}
    assert not [t for t in out.grad_fn.saved_tensors if t is not None and tuple(t.shape) in shapes]  # no dense stack
    assert out.grad_fn.packed[0] is w1 and out.grad_fn.packed[1] is w2  # the 4-bit parameters themselves


def test_4bit_stacks_of_another_dtype_or_that_require_grad_are_refused():
    (hidden, index, weights, w1, w2, lora1, lora2), _ = make_case(7, 24, 40, 3, 2, 1, 1, seed=1)
    down = projection(quantized(w2, "nf4", True), lora2, 1, 2.0)
    from_bf16 = projection(quantized(w1.bfloat16(), "nf4", True), lora1, 1, 0.5)
    reason = routed_experts_supports(hidden, index, weights, from_bf16, down, "silu")
    assert "4-bit gate_up.weight dequantizes to torch.bfloat16 and hidden is torch.float32" in reason
    with pytest.raises(TypeError, match="dequantizes to torch.bfloat16"):
        routed_experts(hidden, index, weights, from_bf16, down, "silu")
    # packed in float32 storage (bitsandbytes' quant_storage, for FSDP), a 4-bit weight can require grad
    trained = projection(quantized(w1, "nf4", True, quant_storage=torch.float32, requires_grad=True), lora1, 1, 0.5)
    assert "requires grad; a quantized weight cannot be trained" in routed_experts_supports(
        hidden, index, weights, trained, down, "silu")
    assert routed_experts_supports(hidden, index, weights, projection(quantized(w1, "fp4", False), lora1, 1, 0.5),
                                   down, "silu") is None


@pytest.mark.gpu
def test_bf16_4bit_stacks_on_gpu_compute_the_op_of_their_dequantization():
    t, h, i, e, k, r = 300, 256, 192, 8, 2, 8
    case = make_case(t, h, i, e, k, r, r, seed=7, dtype=torch.bfloat16, device="cuda")
    w1, w2 = (quantized(w, "nf4", True) for w in case[0][3:5])
    assert w1.device.type == "cuda" and w1.quant_state.dtype == torch.bfloat16
    packed, dense = dequantized(case, w1, w2)
    d_out = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    got = run(routed_experts, packed, r, r, "silu", d_out)
    want = run(routed_experts, dense, r, r, "silu", d_out)
    for g, ref in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert torch.isfinite(g).all() and torch.equal(g, ref)
