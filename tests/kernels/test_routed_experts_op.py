"""The routed-experts op (sloth_fx/kernels/routed_experts.py) and its grouped LoRA kernels
(sloth_fx/kernels/grouped_lora.py) against float64 references.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py) on fp32 CPU tensors. Every
buffer the op allocates starts as NaN (ints as -1), so an element it forgets to write fails.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sloth_fx.kernels.grouped_lora import (
    grouped_base_mm, grouped_lowrank_grad, grouped_lowrank_grad_reference, grouped_lowrank_mm,
    grouped_lowrank_mm_reference,
)
from sloth_fx.kernels.routed_experts import (
    ExpertProjection, RoutedExpertsFunction, routed_experts, routed_experts_reference, routed_experts_supports,
)
from sloth_fx.kernels.toolkit import UnsupportedValue, base_weight_shape

OP_MODULE = importlib.import_module("sloth_fx.kernels.routed_experts")
LORA_MODULE = importlib.import_module("sloth_fx.kernels.grouped_lora")
SLOT_MODULE = importlib.import_module("sloth_fx.kernels.slot_sum")


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh tensors full of NaN (-1 for integers) wherever the op's modules allocate them."""
    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: poison(new_empty(self, *a, **kw)))


def no_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if any part of the op takes a plain-PyTorch reference instead of its Triton kernel."""
    def refuse(*args, **kwargs):
        raise AssertionError("a reference ran where the Triton kernel should")

    for name in ("grouped_lowrank_mm_reference", "grouped_lowrank_grad_reference"):
        monkeypatch.setattr(LORA_MODULE, name, refuse)
    monkeypatch.setattr(OP_MODULE, "gated_mlp_reference", refuse)
    monkeypatch.setattr(SLOT_MODULE, "slot_sum_reference", refuse)


def peft_lora(e: int, out: int, inp: int, r: int, gen: torch.Generator, dtype: torch.dtype,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's leaves lora_A.weight [r·E, in] and lora_B.weight [out, r·E] (views made per call)."""
    a = (torch.randn(r * e, inp, generator=gen) / inp ** 0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(out, r * e, generator=gen) / r ** 0.5).to(device, dtype).requires_grad_()
    return a, b


def projection(weight: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None, r: int,
               scaling: float) -> ExpertProjection:
    if lora is None:
        return ExpertProjection(weight, None, None)
    e, out, inp = base_weight_shape(weight)  # a 4-bit stack's quantized shape (test_routed_experts_4bit.py)
    a, b = lora
    # PEFT's views: A [E, r, in] contiguous, B [E, out, r] a permuted (non-contiguous) view
    return ExpertProjection(weight, a.reshape(e, r, inp), b.reshape(out, r, e).permute(2, 0, 1), scaling)


def make_case(t, h, i, e, k, r1, r2, seed, dtype=torch.float32, device="cpu", every=True):
    """Inputs of one layer: expert 0 gets no token; with ``every`` expert E-1 gets every token."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen).to(device, dtype).requires_grad_()
    scores = torch.rand(t, e, generator=gen)
    scores[:, 0] = -1.0
    if every:
        scores[:, e - 1] = 2.0
    index = scores.topk(k, dim=1).indices.to(device)
    weights = torch.rand(t, k, generator=gen).to(device, dtype).requires_grad_()
    w1 = (torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5).to(device, dtype)
    w2 = (torch.randn(e, h, i, generator=gen) / i ** 0.5).to(device, dtype)
    lora1 = None if r1 is None else peft_lora(e, 2 * i, h, r1, gen, dtype, device)
    lora2 = None if r2 is None else peft_lora(e, h, i, r2, gen, dtype, device)
    leaves = [hidden, weights, *(lora1 or ()), *(lora2 or ())]
    return (hidden, index, weights, w1, w2, lora1, lora2), leaves


def run(fn, case, r1, r2, activation, d_out):
    hidden, index, weights, w1, w2, lora1, lora2 = case[0]
    out = fn(hidden, index, weights, projection(w1, lora1, r1, 0.5), projection(w2, lora2, r2, 2.0), activation)
    return out, torch.autograd.grad(out, case[1], d_out)


def assert_matches(got, ref, rel):
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=rel, atol=rel * r.abs().max().item())


# (T, H, I, E, k, r1, r2, activation, every): odd sizes; r None: no LoRA on that projection
CASES = [
    (7, 24, 40, 3, 1, 1, 3, "silu", False),
    (37, 45, 29, 5, 2, 3, 1, "gelu_tanh", True),
    (37, 24, 40, 5, 2, 3, None, "silu", True),
    (7, 45, 29, 3, 2, None, 1, "gelu_tanh", True),
    (7, 24, 40, 9, 8, 1, 3, "silu", True),
    (13, 45, 29, 9, 8, 3, 3, "gelu", False),
]


@pytest.mark.parametrize("t,h,i,e,k,r1,r2,activation,every", CASES)
def test_triton_op_matches_float64_reference(t, h, i, e, k, r1, r2, activation, every, poisoned, monkeypatch):
    case = make_case(t, h, i, e, k, r1, r2, seed=t * e + k)
    d_out = torch.randn(t, h, generator=torch.Generator().manual_seed(k))
    ref = run(routed_experts_reference, case, r1, r2, activation, d_out)
    no_references(monkeypatch)
    got = run(routed_experts, case, r1, r2, activation, d_out)
    assert type(got[0].grad_fn).__name__ == f"{RoutedExpertsFunction.__name__}Backward"
    assert_matches([got[0], *got[1]], [ref[0], *ref[1]], rel=2e-5)


def test_float64_through_the_references_matches_exactly(poisoned, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: every kernel's reference
    case = make_case(37, 45, 29, 5, 2, 3, 1, seed=11, dtype=torch.float64)
    d_out = torch.randn(37, 45, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = run(routed_experts_reference, case, 3, 1, "silu", d_out)
    got = run(routed_experts, case, 3, 1, "silu", d_out)
    assert_matches([got[0], *got[1]], [ref[0], *ref[1]], rel=1e-12)


def test_expanded_output_gradient_and_no_token_at_all(poisoned):
    case = make_case(7, 24, 40, 5, 2, 1, 1, seed=5)
    hidden, index, weights, w1, w2, lora1, lora2 = case[0]
    args = (projection(w1, lora1, 1, 0.5), projection(w2, lora2, 1, 2.0), "silu")
    routed_experts(hidden, index, weights, *args).sum().backward()  # d_out: an expanded (stride 0) tensor
    loss = routed_experts_reference(hidden.detach(), index, weights.detach(), *args).sum()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weights.grad).all()
    empty = routed_experts(hidden[:0], index[:0], weights[:0], *args)
    assert empty.shape == (0, 24) and torch.isfinite(loss)


# expert segments: empty ones first, last and between; one expert with everything
SEGMENTS = [[0, 37, 5, 0, 1], [0, 0, 70], [3], [16, 0, 67, 0]]


def segments(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32), sum(counts), len(counts)


@pytest.mark.parametrize("counts", SEGMENTS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.float16, torch.float32)])
def test_grouped_lowrank_kernels_match_references(counts, dtypes, poisoned):
    offsets, s, e = segments(counts)
    gen = torch.Generator().manual_seed(s + e)
    dx, dw = dtypes
    for n, k in ((3, 45), (40, 1), (130, 5)):  # x·Aᵀ (long K, the rank out), U·Bᵀ (rank K, wide out)
        x = torch.randn(s, k, generator=gen).to(dx)
        w = torch.randn(n, k, e, generator=gen).to(dw).permute(2, 0, 1)  # strided, as PEFT's lora_B
        fresh = grouped_lowrank_mm(x, w, offsets)
        ref = grouped_lowrank_mm_reference(x.double(), w.double(), offsets, torch.zeros(s, n, dtype=torch.float64))
        torch.testing.assert_close(fresh.double(), ref, rtol=1e-5, atol=1e-5)
        base = torch.randn(s, n, generator=gen).to(dx)
        got = grouped_lowrank_mm(x, w, offsets, base.clone(), alpha=-0.75, accumulate=True)
        ref = grouped_lowrank_mm_reference(x.double(), w.double(), offsets, base.double(), alpha=-0.75,
                                           accumulate=True)
        tol = 1e-5 if dx == torch.float32 else 2e-3
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
        p = torch.randn(s, n, generator=gen).to(dx)
        out = torch.empty(n, k, e, dtype=dw).permute(2, 0, 1)  # [E, n, k] in PEFT's lora_B strides
        got = grouped_lowrank_grad(p, x, offsets, out, alpha=1.5)
        assert got.data_ptr() == out.data_ptr()
        ref = grouped_lowrank_grad_reference(p.double(), x.double(), offsets, torch.zeros(e, n, k, dtype=torch.float64),
                                             alpha=1.5)
        tol = 1e-5 if dw == torch.float32 else 2e-3  # one rounding into out's dtype
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
        assert (got[torch.tensor(counts) == 0] == 0).all()
        rows = torch.randint(0, 9, (s,), generator=gen)  # q's rows gathered in the kernel, not copied
        source = torch.randn(9, k, generator=gen).to(dx)
        got = grouped_lowrank_grad(p, source, offsets, torch.empty(e, n, k, dtype=dw), alpha=1.5, q_rows=rows)
        ref = grouped_lowrank_grad_reference(p.double(), source.double()[rows], offsets,
                                             torch.zeros(e, n, k, dtype=torch.float64), alpha=1.5)
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("h", [24, 45])  # 16-byte rows (torch's grouped GEMM on CPU) and not (the loop)
def test_grouped_base_mm(h, poisoned):
    offsets, s, e = segments([0, 37, 5, 0, 1])
    gen = torch.Generator().manual_seed(h)
    x = torch.randn(s, h, generator=gen)
    w = torch.randn(e, 40, h, generator=gen)
    got = grouped_base_mm(x, w.transpose(-2, -1), offsets)
    ref = torch.cat([x[lo:hi] @ w[j].T for j, (lo, hi) in enumerate(zip([0, 0, 37, 42, 42], [0, 37, 42, 42, 43]))])
    torch.testing.assert_close(got, ref)


def test_grouped_products_refuse_offsets_that_are_not_one_per_expert():
    """A longer ``offsets`` (the op once counted a 4-bit stack's experts by its packed storage's rows)
    would make every product loop over empty groups: each grouped product names the mismatch."""
    offsets, s, e = segments([2, 3, 1])
    x, w = torch.randn(s, 8), torch.randn(e, 4, 8)
    too_long = torch.cat([offsets, offsets[-1:].expand(5)])
    for call in (lambda: grouped_base_mm(x, w.transpose(-2, -1), too_long),
                 lambda: grouped_lowrank_mm(x, w, too_long),
                 lambda: grouped_lowrank_grad(x, torch.randn(s, 4), too_long, torch.empty(e, 8, 4))):
        with pytest.raises(ValueError, match="one segment end for each of the 3 experts"):
            call()
    with pytest.raises(ValueError, match="must name one row of q for each of p's 6 rows"):
        grouped_lowrank_grad(x, torch.randn(2, 4), offsets, torch.empty(e, 8, 4),
                             q_rows=torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("h,i", [(24, 40), (45, 29)])  # rows torch's grouped GEMM takes, and unaligned ones
def test_trainable_expert_weights_get_their_gradients(h, i, poisoned):
    """A full finetune (no LoRA, the stacked weights train): dW1 and dW2 per expert, an idle
    expert's zero, beside the gradients of hidden and the routing weights."""
    (hidden, index, weights, w1, w2, _, _), _ = make_case(13, h, i, 5, 2, None, None, seed=3)
    leaves = [hidden, weights, w1.requires_grad_(), w2.requires_grad_()]
    case = ((hidden, index, weights, w1, w2, None, None), leaves)
    d_out = torch.randn(13, h, generator=torch.Generator().manual_seed(4))
    ref = run(routed_experts_reference, case, None, None, "silu", d_out)
    got = run(routed_experts, case, None, None, "silu", d_out)
    assert_matches([got[0], *got[1]], [ref[0], *ref[1]], rel=2e-5)
    assert got[1][2][0].abs().max() == 0  # expert 0 received no token


def test_supports_refuses_what_the_op_does_not_take():
    (hidden, index, weights, w1, w2, lora1, lora2), _ = make_case(7, 24, 40, 3, 2, 1, 1, seed=1)
    gate_up, down = projection(w1, lora1, 1, 0.5), projection(w2, lora2, 1, 2.0)
    assert routed_experts_supports(hidden, index, weights, gate_up, down, "silu") is None
    assert "unknown activation" in routed_experts_supports(hidden, index, weights, gate_up, down, "relu")
    one_sided = ExpertProjection(w1, gate_up.lora_a, None)
    assert "without the other" in routed_experts_supports(hidden, index, weights, one_sided, down, "silu")
    assert "must be [E, 2I, 20]" in routed_experts_supports(hidden[:, :20], index, weights, gate_up, down, "silu")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # shapes and dtypes only: fake tensors do
        fake = mode.from_tensor(hidden.detach())
        assert routed_experts_supports(fake, index, weights, gate_up, down, "silu") is None


@pytest.mark.gpu
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])  # PEFT keeps adapters in fp32
def test_bf16_on_gpu_without_host_sync(lora_dtype):
    t, h, i, e, k, r = 300, 256, 192, 8, 2, 8
    case = list(make_case(t, h, i, e, k, r, r, seed=7, dtype=torch.bfloat16, device="cuda"))
    hidden, index, weights, w1, w2, lora1, lora2 = case[0]
    lora1, lora2 = ([x.detach().to(lora_dtype).requires_grad_() for x in lora] for lora in (lora1, lora2))
    case = ((hidden, index, weights, w1, w2, lora1, lora2), [hidden, weights, *lora1, *lora2])
    d_out = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    run(routed_experts, case, r, r, "silu", d_out)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = run(routed_experts, case, r, r, "silu", d_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    wide = [[x.detach().float().requires_grad_() for x in lora] for lora in (lora1, lora2)]
    leaves = [hidden.detach().float().requires_grad_(), weights.detach().float().requires_grad_(), *wide[0], *wide[1]]
    ref_case = ((leaves[0], index, leaves[1], w1.float(), w2.float(), wide[0], wide[1]), leaves)
    ref = run(routed_experts_reference, ref_case, r, r, "silu", d_out.float())
    for g, want in zip([got[0], *got[1]], [ref[0], *ref[1]]):
        err = (g.double() - want.double()).norm() / want.double().norm()
        assert torch.isfinite(g).all() and err < 2e-2, err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_fp32_tile_products_keep_fp32_accuracy_on_gpu(precision, monkeypatch):
    """LoRA's fp32 factors and ``U`` at M1's widths (hidden 2048, rank 16, 2·768 gate/up) and
    ragged experts: each ``FP32_DOT`` choice stays within fp32's accuracy of float64."""
    monkeypatch.setattr(LORA_MODULE, "FP32_DOT", precision)
    offsets, s, e = segments([0, 700, 1, 1300, 37, 0, 2])
    offsets = offsets.cuda()
    gen = torch.Generator(device="cuda").manual_seed(5)
    for n, k in ((16, 2048), (1536, 16)):
        x = torch.randn(s, k, generator=gen, device="cuda")
        w = torch.randn(e, n, k, generator=gen, device="cuda")
        got = grouped_lowrank_mm(x, w, offsets)
        ref = grouped_lowrank_mm_reference(x.double(), w.double(), offsets,
                                           torch.zeros(s, n, dtype=torch.float64, device="cuda"))
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(got).all() and err < 1e-6, (precision, n, k, err)
        p = torch.randn(s, n, generator=gen, device="cuda")
        got = grouped_lowrank_grad(p, x, offsets, torch.empty(e, n, k, device="cuda"))
        ref = grouped_lowrank_grad_reference(p.double(), x.double(), offsets,
                                             torch.zeros(e, n, k, dtype=torch.float64, device="cuda"))
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert torch.isfinite(got).all() and err < 1e-6, (precision, n, k, err)
