"""Every op launches on its tensors' GPU, not on the current one: on a host of several GPUs, each
op on the second GPU computes what it computes on the first, bit for bit, outputs and gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sloth_fx.kernels.cross_entropy import linear_cross_entropy
from sloth_fx.kernels.lora import lora_linear_group
from sloth_fx.kernels.lowrank_mm import lowrank_mm
from sloth_fx.kernels.rmsnorm import rmsnorm
from sloth_fx.kernels.rope import rope
from sloth_fx.kernels.gated_mlp import gated_mlp

pytestmark = pytest.mark.gpu


def _inputs(device: torch.device) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)

    def t(*shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    return {
        "rmsnorm": [t(7, 96), t(96)],
        "gated_mlp": [t(7, 96), t(7, 96)],
        "rope": [t(2, 4, 5, 64), t(2, 2, 5, 64), t(1, 5, 64, grad=False), t(1, 5, 64, grad=False)],
        "cross_entropy": [t(9, 32), t(50, 32), torch.randint(0, 50, (9,), generator=g).to(device)],
        "lowrank_mm": [t(4096, 16, grad=False), t(16, 16384, dtype=torch.float32, grad=False)],
        "lora": [t(7, 64), t(48, 64, grad=False), t(8, 64, dtype=torch.float32), t(48, 8, dtype=torch.float32)],
    }


OPS: dict[str, Callable[..., object]] = {
    "rmsnorm": lambda x, w: rmsnorm(x, w, 1e-6),
    "gated_mlp": gated_mlp,
    "rope": rope,
    "cross_entropy": linear_cross_entropy,
    "lowrank_mm": lowrank_mm,
    "lora": lambda x, w, a, b: lora_linear_group(x, [w], [a], [b], [2.0]),
}


def _run(op: str, device: torch.device) -> list[torch.Tensor]:
    args = _inputs(device)[op]
    out = OPS[op](*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    leaves = [a for a in args if a.requires_grad]
    grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs]) if leaves else []
    return [t.cpu() for t in (*outs, *grads)]


@pytest.mark.parametrize("op", list(OPS))
def test_op_on_a_gpu_that_is_not_current(op: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU")
    with torch.cuda.device(0):
        on_current = _run(op, torch.device("cuda", 0))
        on_other = _run(op, torch.device("cuda", 1))
        assert torch.cuda.current_device() == 0
    for a, b in zip(on_current, on_other, strict=True):
        assert torch.equal(a, b)
