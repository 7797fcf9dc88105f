"""A new token count never compiles a kernel again (GPU: the interpreter compiles nothing).

Ragged batches give each step another token count. Triton compiles one variant of a kernel per
class of each specialised integer argument (1, a multiple of 16, other), so a kernel that took the
token count as a specialised argument stopped the first step whose count was a multiple of 16
for a compile (sloth_fx/kernels/toolkit.py). The counts below fall in every class.
"""

from __future__ import annotations

import pytest
import torch

from sloth_fx.kernels import rmsnorm_kernel, rope_kernel
from sloth_fx.kernels.rmsnorm_kernel import rmsnorm_backward, rmsnorm_forward
from sloth_fx.kernels.rope_kernel import empty_bhsd, rotate_into

TOKEN_COUNTS = (17, 32, 1, 48, 33)


def compiled_variants(kernel: object, device: torch.device) -> int:
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps no per-device kernel cache to count")
    return len(caches[device.index if device.index is not None else torch.cuda.current_device()][0])


@pytest.mark.gpu
def test_gpu_rmsnorm_backward_compiles_once_for_every_token_count() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    hidden = 256
    weight = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    counts = []
    for tokens in TOKEN_COUNTS:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        _, rstd = rmsnorm_forward(x, weight, 1e-5, 0.0, torch.bfloat16, torch.bfloat16)
        dx, dw = rmsnorm_backward(torch.randn_like(x), x, weight, rstd, 0.0, torch.bfloat16, need_dx=True, need_dw=True)
        assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
        counts.append(compiled_variants(rmsnorm_kernel._rmsnorm_bwd_kernel, device))
    assert counts[-1] == counts[0], f"variants after each token count {TOKEN_COUNTS}: {counts}"


@pytest.mark.gpu
def test_gpu_rope_compiles_once_for_every_token_count() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    heads, kv_heads, head_dim = 4, 2, 64
    counts = []
    for tokens in TOKEN_COUNTS:
        q = torch.randn(1, tokens, heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, tokens, kv_heads, head_dim, device=device, dtype=torch.bfloat16).transpose(1, 2)
        cos = torch.randn(1, tokens, head_dim, device=device, dtype=torch.bfloat16)
        sin = torch.randn(1, tokens, head_dim, device=device, dtype=torch.bfloat16)
        q_out, k_out = empty_bhsd(q.shape, q.dtype, device), empty_bhsd(k.shape, k.dtype, device)
        rotate_into(q, k, cos, sin, q_out, k_out, backward=False)
        assert torch.isfinite(q_out).all() and torch.isfinite(k_out).all()
        counts.append(compiled_variants(rope_kernel._rope_kernel, device))
    assert counts[-1] == counts[0], f"variants after each token count {TOKEN_COUNTS}: {counts}"
