"""A routed-experts module's own forward over 4-bit stacks: their dense dequantization, swapped in
for the call.

transformers' experts forward indexes its stacks as dense tensors (``self.gate_up_proj[e]``), and
PEFT's ``ParamWrapper`` registers a torch parametrization on the base module's parameter for its
call (``W + s·B·A``, folded by ``baddbmm`` in W's dtype). A bitsandbytes 4-bit stack is packed 2-D
``uint8``: neither can read it. So for that one call each 4-bit stack of the module is replaced by
a frozen dense parameter, ``dequantize_4bit`` of it in its quantization dtype, and put back after
(``try``/``finally``): PEFT's parametrization and transformers' forward see dense weights, and
compute exactly what QLoRA defines (the dequantized weight plus the adapter). No parametrization
of sloth_fx's own is added: PEFT removes only its own proxy where several stack on a parameter.

This is the unfused path (sloth_fx's fallback and the fused op's first-call check) and the model's
path without sloth_fx (:class:`DequantizedExperts`). It trains as the module does, so autograd
keeps each layer's dense stacks until backward, as it keeps a bf16 model's: exact, not lean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sloth_fx.capture.experts_form import adapter_mismatch, peft_wrappers
from sloth_fx.kernels.toolkit import dense_weight, is_4bit


@contextlib.contextmanager
def dense_stacks(module: nn.Module) -> Iterator[None]:
    """Within the block, every 4-bit parameter of the experts module that ``module`` is (or that
    PEFT's wrappers in ``module`` wrap) is a frozen dense ``nn.Parameter`` of its dequantized
    values; the 4-bit ones are back after. Raises ValueError where PEFT built an adapter for a
    stack's packed storage (its forward could not compute it)."""
    wrappers, base = peft_wrappers(module)
    packed = {name: p for name, p in base.named_parameters(recurse=False) if is_4bit(p)}
    for name, p in packed.items():
        mismatch = adapter_mismatch(wrappers[name], p, getattr(base, "is_transposed", False)) \
            if name in wrappers else None
        if mismatch:
            raise ValueError(f"{type(base).__name__}.{name}: {mismatch}")
    try:
        for name, p in packed.items():
            setattr(base, name, nn.Parameter(dense_weight(p, p.quant_state.dtype), requires_grad=False))
        yield
    finally:
        for name, p in packed.items():
            setattr(base, name, p)


class DequantizedExperts:
    """The ``forward`` that :func:`sloth_fx.quantize_experts` gives a routed-experts module (the
    outermost of PEFT's wrappers): its class's forward within :func:`dense_stacks`, so that the
    model runs without sloth_fx too. :func:`sloth_fx.optimize` replaces it by its fused op
    (whose fallback does the same) and ``uninstall`` puts it back."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @torch._dynamo.disable  # swapping a module's parameters is no graph: Dynamo breaks here, once
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with dense_stacks(self.module):
            return type(self.module).forward(self.module, *args, **kwargs)
