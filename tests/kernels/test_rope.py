"""Tests for the fused rotary embedding (sloth_fx/kernels/rope.py) against a float64 reference."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig
from transformers.models.bamba.modeling_bamba import (
    apply_rotary_pos_emb as hf_partial_apply_rotary_pos_emb,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from sloth_fx.kernels.rope import RoPEFunction, rope, rope_reference, rope_supports
from sloth_fx.kernels.rope_kernel import empty_bhsd, rotate_into

_seed = itertools.count(1234)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(next(_seed))


def make_qk(
    b: int, s: int, hq: int, hk: int, d: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k as HF's attention makes them: projection output [B, S, H*D] -> view -> transpose."""
    q_proj = torch.randn(b, s, hq * d, generator=gen).to(device=device, dtype=dtype)
    k_proj = torch.randn(b, s, hk * d, generator=gen).to(device=device, dtype=dtype)
    q = q_proj.view(b, s, hq, d).transpose(1, 2)
    k = k_proj.view(b, s, hk, d).transpose(1, 2)
    assert not q.is_contiguous() or hq == 1 or s == 1
    return q, k


def random_tables(
    b: int, s: int, rot: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary per-row cos/sin whose two halves differ (not a rotary table)."""
    cos = torch.randn(b, s, rot, generator=gen).to(device=device, dtype=dtype)
    sin = torch.randn(b, s, rot, generator=gen).to(device=device, dtype=dtype)
    return cos, sin


def real_tables(
    position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin from HF's LlamaRotaryEmbedding at the given position_ids."""
    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim
    )
    emb = LlamaRotaryEmbedding(config).to(device)
    x = torch.zeros(1, dtype=dtype, device=device)
    return emb(x, position_ids.to(device))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def reference64(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    gq: torch.Tensor, gk: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and input gradients of the reference in float64."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    qo, ko = rope_reference(q64, k64, cos.double(), sin.double())
    dq, dk = torch.autograd.grad((qo, ko), (q64, k64), (gq.double(), gk.double()))
    return qo.detach(), ko.detach(), dq, dk


def check_against_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gen: torch.Generator,
    contiguous_grads: bool = False,
) -> None:
    tol = TOL[q.dtype]
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    assert type(qo.grad_fn).__name__ == "RoPEFunctionBackward"
    assert qo.shape == q.shape and ko.shape == k.shape
    assert qo.dtype == torch.promote_types(q.dtype, cos.dtype)
    # Output memory is [B, S, H, D], returned as the transposed view (HF's layout).
    assert qo.transpose(1, 2).is_contiguous() and ko.transpose(1, 2).is_contiguous()
    if contiguous_grads:  # [B, H, S, D] contiguous: strides unlike the output's
        gq = torch.randn(qo.shape, generator=gen).to(qo.device, qo.dtype)
        gk = torch.randn(ko.shape, generator=gen).to(ko.device, ko.dtype)
    else:  # a transposed view of a [B, S, H, D] buffer, as the attention backward gives
        gq = torch.randn(qo.transpose(1, 2).shape, generator=gen).to(qo.device, qo.dtype).transpose(1, 2)
        gk = torch.randn(ko.transpose(1, 2).shape, generator=gen).to(ko.device, ko.dtype).transpose(1, 2)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    rq, rk, rdq, rdk = reference64(q, k, cos, sin, gq, gk)
    for out, ref in ((qo, rq), (ko, rk), (dq, rdq), (dk, rdk)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < tol, rel_err(out, ref)
    assert dq.dtype == q.dtype and dk.dtype == k.dtype


# (B, S, Hq, Hk, D, rotary_dim)
SHAPES = [
    (2, 7, 4, 2, 64, 64),  # GQA
    (1, 1, 4, 2, 128, 128),  # single token
    (2, 5, 3, 1, 80, 80),  # head_dim 80 (masked halves of 40), odd head count
    (1, 3, 2, 2, 96, 96),  # head_dim 96, MHA
    (1, 2, 20, 4, 256, 256),  # head_dim 256: 16 heads per step, so q loops twice (masked)
    (1, 2, 32, 8, 128, 128),  # Llama-3/Mistral head layout (long rows)
    (2, 4, 4, 2, 64, 32),  # partial rotary, tail 32
    (1, 3, 2, 1, 80, 24),  # partial rotary: half 12, tail 56 (both masked)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_tables_forward_backward(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    b, s, hq, hk, d, rot = shape
    gen = fresh_generator()
    q, k = make_qk(b, s, hq, hk, d, dtype, device, gen)
    cos, sin = random_tables(b, s, rot, dtype, device, gen)
    check_against_reference(q, k, cos, sin, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_contiguous_bhsd_inputs_and_grads(dtype: torch.dtype, device: torch.device) -> None:
    """Strides other than the projection-view ones: contiguous [B, H, S, D] q/k and grads."""
    gen = fresh_generator()
    q = torch.randn(2, 3, 5, 64, generator=gen).to(device, dtype)
    k = torch.randn(2, 1, 5, 64, generator=gen).to(device, dtype)
    cos, sin = random_tables(2, 5, 64, dtype, device, gen)
    check_against_reference(q, k, cos, sin, gen, contiguous_grads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_positions", [True, False], ids=["per-row-positions", "shared-positions"])
def test_real_llama_tables(dtype: torch.dtype, batch_positions: bool, device: torch.device) -> None:
    """cos/sin from LlamaRotaryEmbedding at arbitrary position_ids ([B, S] or broadcast [1, S])."""
    gen = fresh_generator()
    b, s, hq, hk, d = 3, 6, 4, 2, 64
    if batch_positions:  # left padding / packing: each row its own arbitrary positions
        position_ids = torch.randint(0, 4096, (b, s), generator=gen)
    else:
        position_ids = torch.arange(s).unsqueeze(0) + 17
    cos, sin = real_tables(position_ids, d, dtype, device)
    assert cos.shape == (position_ids.shape[0], s, d) and cos.dtype == dtype
    q, k = make_qk(b, s, hq, hk, d, dtype, device, gen)
    check_against_reference(q, k, cos, sin, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_dtype_promotes_like_hf(dtype: torch.dtype, device: torch.device) -> None:
    """fp16 q/k with fp32 tables (autocast-style): HF's q * cos gives fp32; so does the op."""
    gen = fresh_generator()
    q, k = make_qk(2, 3, 2, 1, 64, torch.float16, device, gen)
    cos, sin = random_tables(2, 3, 64, torch.float32, device, gen)
    qo, ko = rope(q, k, cos, sin)
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    assert qo.dtype == rq.dtype == torch.float32
    check_against_reference(q, k, cos, sin, gen)


def test_only_q_requires_grad(device: torch.device) -> None:
    gen = fresh_generator()
    q, k = make_qk(1, 4, 2, 2, 64, torch.float32, device, gen)
    cos, sin = random_tables(1, 4, 64, torch.float32, device, gen)
    q.requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    gq = torch.randn(qo.shape, generator=gen).to(device)
    (dq,) = torch.autograd.grad((qo * gq).sum(), (q,))
    _, _, rdq, _ = reference64(q, k, cos, sin, gq, torch.zeros_like(ko))
    assert rel_err(dq, rdq) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 3, 1, 80, 80), (1, 2, 2, 2, 64, 40)], ids=["full", "partial"])
def test_poisoned_outputs_all_written(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Forward and backward launches into NaN-filled buffers: every element must be written."""
    b, s, hq, hk, d, rot = shape
    gen = fresh_generator()
    q, k = make_qk(b, s, hq, hk, d, dtype, device, gen)
    cos, sin = random_tables(b, s, rot, dtype, device, gen)
    q_out = empty_bhsd(q.shape, dtype, device).fill_(float("nan"))
    k_out = empty_bhsd(k.shape, dtype, device).fill_(float("nan"))
    rotate_into(q, k, cos, sin, q_out, k_out, backward=False)
    gq = torch.randn(q.shape, generator=gen).to(device, dtype)
    gk = torch.randn(k.shape, generator=gen).to(device, dtype)
    dq = empty_bhsd(q.shape, dtype, device).fill_(float("nan"))
    dk = empty_bhsd(k.shape, dtype, device).fill_(float("nan"))
    rotate_into(gq, gk, cos, sin, dq, dk, backward=True)
    rq, rk, rdq, rdk = reference64(q, k, cos, sin, gq, gk)
    for out, ref in ((q_out, rq), (k_out, rk), (dq, rdq), (dk, rdk)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[dtype]


def test_backward_is_not_the_inverse_rotation_for_general_tables(device: torch.device) -> None:
    """With unequal halves the transpose differs from 'rotate by -theta' (sin negated): the
    kernel must give the transpose."""
    gen = fresh_generator()
    q, k = make_qk(1, 2, 1, 1, 8, torch.float32, device, gen)
    cos, sin = random_tables(1, 2, 8, torch.float32, device, gen)
    gq = torch.randn(q.shape, generator=gen).to(device)
    gk = torch.randn(k.shape, generator=gen).to(device)
    dq = empty_bhsd(q.shape, torch.float32, device)
    dk = empty_bhsd(k.shape, torch.float32, device)
    rotate_into(gq, gk, cos, sin, dq, dk, backward=True)
    _, _, rdq, rdk = reference64(q, k, cos, sin, gq, gk)
    assert rel_err(dq, rdq) < 1e-5 and rel_err(dk, rdk) < 1e-5
    naive, _ = rope_reference(gq.double(), gk.double(), cos.double(), -sin.double())
    assert rel_err(naive, rdq) > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_hf(dtype: torch.dtype) -> None:
    """rope_reference is bit-identical to HF's functions (Llama's full, Bamba's partial)."""
    gen = fresh_generator()
    q, k = make_qk(2, 5, 4, 2, 64, dtype, torch.device("cpu"), gen)
    cos, sin = random_tables(2, 5, 64, dtype, torch.device("cpu"), gen)
    for ours, theirs in zip(rope_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(ours, theirs)
        assert ours.stride() == theirs.stride()
    cos_p, sin_p = cos[..., :32], sin[..., :32]
    for ours, theirs in zip(
        rope_reference(q, k, cos_p, sin_p), hf_partial_apply_rotary_pos_emb(q, k, cos_p, sin_p)
    ):
        assert torch.equal(ours, theirs)


def test_cos_requiring_grad_falls_back_to_reference(device: torch.device) -> None:
    gen = fresh_generator()
    q, k = make_qk(1, 3, 2, 1, 64, torch.float32, device, gen)
    cos, sin = random_tables(1, 3, 64, torch.float32, device, gen)
    cos.requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    assert "RoPEFunction" not in type(qo.grad_fn).__name__
    (dcos,) = torch.autograd.grad(qo.sum() + ko.sum(), (cos,))
    cos64 = cos.detach().double().requires_grad_()
    rq, rk = rope_reference(q.double(), k.double(), cos64, sin.double())
    (rdcos,) = torch.autograd.grad(rq.sum() + rk.sum(), (cos64,))
    assert rel_err(dcos, rdcos) < 1e-5


def test_function_is_used_on_the_triton_path(device: torch.device) -> None:
    gen = fresh_generator()
    q, k = make_qk(1, 2, 2, 1, 64, torch.float32, device, gen)
    cos, sin = random_tables(1, 2, 64, torch.float32, device, gen)
    q.requires_grad_()
    qo, _ = rope(q, k, cos, sin)
    assert qo.grad_fn is not None and qo.grad_fn.__class__.__name__ == f"{RoPEFunction.__name__}Backward"


BAD_INPUTS = [
    (lambda: (torch.randn(2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 64)), ValueError, "4-d"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(3, 64), torch.randn(3, 64)), ValueError, "3-d"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 32)), ValueError, "equal shape"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 4, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 64)), ValueError, "must agree"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(2, 3, 30 + 1), torch.randn(2, 3, 31)), ValueError, "even"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(2, 3, 128), torch.randn(2, 3, 128)), ValueError, "rotary_dim"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(3, 3, 64), torch.randn(3, 3, 64)), ValueError, "broadcast"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64).half(), torch.randn(2, 3, 64), torch.randn(2, 3, 64)), TypeError, "one dtype"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), torch.randn(2, 3, 64), torch.randn(2, 3, 64).half()), TypeError, "one dtype"),
    (lambda: (torch.randn(2, 2, 3, 64).double(), torch.randn(2, 1, 3, 64).double(), torch.randn(2, 3, 64), torch.randn(2, 3, 64)), TypeError, "float64"),
    (lambda: (torch.randn(2, 2, 3, 64), torch.randn(2, 1, 3, 64), "cos", torch.randn(2, 3, 64)), TypeError, "cos"),
]


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_bad_inputs_raise(make, exc: type[Exception], match: str) -> None:  # noqa: ANN001
    q, k, cos, sin = make()
    with pytest.raises(exc, match=match):
        rope(q, k, cos, sin)


@pytest.mark.parametrize("make, exc, match", BAD_INPUTS)
def test_supports_answers_what_the_fused_op_raises(make, exc: type[Exception], match: str) -> None:  # noqa: ANN001
    reason = rope_supports(*make())
    assert reason is not None and re.search(match, reason), reason


def test_supports_takes_fake_tensors() -> None:
    with FakeTensorMode():
        q, k, table = torch.empty(2, 4, 5, 64), torch.empty(2, 2, 5, 64), torch.empty(1, 5, 32)
        assert rope_supports(q, k, table, table) is None  # partial rotary, tables broadcast over the batch
        assert "requires grad" in rope_supports(q, k, table.clone().requires_grad_(), table)


# ---------------------------------------------------------------- GPU (bf16, large) -----------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES + [(2, 512, 32, 8, 128, 128)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_random_tables(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    device = torch.device("cuda")
    b, s, hq, hk, d, rot = shape
    gen = fresh_generator()
    q, k = make_qk(b, s, hq, hk, d, dtype, device, gen)
    cos, sin = random_tables(b, s, rot, dtype, device, gen)
    check_against_reference(q, k, cos, sin, gen)


@pytest.mark.gpu
@pytest.mark.parametrize("batch_positions", [True, False])
def test_gpu_real_tables_bf16(batch_positions: bool) -> None:
    device = torch.device("cuda")
    gen = fresh_generator()
    b, s, hq, hk, d = 2, 300, 32, 8, 128
    position_ids = (
        torch.randint(0, 8192, (b, s), generator=gen) if batch_positions else torch.arange(s).unsqueeze(0)
    )
    cos, sin = real_tables(position_ids, d, torch.bfloat16, device)
    q, k = make_qk(b, s, hq, hk, d, torch.bfloat16, device, gen)
    check_against_reference(q, k, cos, sin, gen)


@pytest.mark.gpu
def test_gpu_poisoned_bf16() -> None:
    device = torch.device("cuda")
    gen = fresh_generator()
    q, k = make_qk(2, 33, 5, 3, 80, torch.bfloat16, device, gen)
    cos, sin = random_tables(2, 33, 80, torch.bfloat16, device, gen)
    q_out = empty_bhsd(q.shape, q.dtype, device).fill_(float("nan"))
    k_out = empty_bhsd(k.shape, k.dtype, device).fill_(float("nan"))
    rotate_into(q, k, cos, sin, q_out, k_out, backward=False)
    rq, rk = rope_reference(q.double(), k.double(), cos.double(), sin.double())
    for out, ref in ((q_out, rq), (k_out, rk)):
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_past_int32_offsets() -> None:
    """q with more than 2^31 elements: the last tokens must be addressed correctly."""
    device = torch.device("cuda")
    d, hq, hk = 128, 32, 1
    s = (1 << 31) // (hq * d) + 8
    gen = torch.Generator(device=device).manual_seed(next(_seed))
    q = torch.randn(1, s, hq * d, device=device, dtype=torch.bfloat16, generator=gen).view(1, s, hq, d).transpose(1, 2)
    k = torch.randn(1, s, hk * d, device=device, dtype=torch.bfloat16, generator=gen).view(1, s, hk, d).transpose(1, 2)
    cos = torch.randn(1, s, d, device=device, dtype=torch.bfloat16, generator=gen)
    sin = torch.randn(1, s, d, device=device, dtype=torch.bfloat16, generator=gen)
    assert q.numel() > 2**31
    qo, ko = rope(q, k, cos, sin)
    tail = slice(s - 16, s)
    rq, rk = rope_reference(
        q[:, :, tail].double(), k[:, :, tail].double(), cos[:, tail].double(), sin[:, tail].double()
    )
    assert rel_err(qo[:, :, tail], rq) < TOL[torch.bfloat16]
    assert rel_err(ko[:, :, tail], rk) < TOL[torch.bfloat16]


def test_dispatch_off_triton_is_hf_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Triton does not run, rope() is HF's apply_rotary_pos_emb, bit for bit."""
    import sloth_fx.kernels.rope as rope_module

    monkeypatch.setattr(rope_module, "use_triton", lambda *tensors: False)
    gen = fresh_generator()
    q, k = make_qk(2, 4, 4, 2, 64, torch.float16, torch.device("cpu"), gen)
    cos, sin = random_tables(2, 4, 64, torch.float16, torch.device("cpu"), gen)
    for ours, theirs in zip(rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert ours.grad_fn is None
        assert torch.equal(ours, theirs)


def test_token_count_changing_between_calls(device: torch.device) -> None:
    """Tile sizes are cached per head layout and table strides computed per call: S = 5, 17, 5
    (the tables broadcast over the batch) each match float64, and the second S = 5 call repeats
    the first bit for bit."""
    gen = fresh_generator()
    inputs = {}
    for s in (5, 17):
        q, k = make_qk(2, s, 4, 2, 64, torch.float16, device, gen)
        cos, sin = random_tables(1, s, 64, torch.float16, device, gen)
        gq = torch.randn(2, s, 4, 64, generator=gen).to(device, torch.float16).transpose(1, 2)
        gk = torch.randn(2, s, 2, 64, generator=gen).to(device, torch.float16).transpose(1, 2)
        inputs[s] = (q, k, cos, sin, gq, gk)
    runs = []
    for s in (5, 17, 5):
        q, k, cos, sin, gq, gk = inputs[s]
        check_against_reference(q, k, cos, sin, gen)
        q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
        qo, ko = rope(q, k, cos, sin)
        runs.append((qo, ko, *torch.autograd.grad((qo, ko), (q, k), (gq, gk))))
    for first, again in zip(runs[0], runs[2]):
        assert torch.equal(first, again)
