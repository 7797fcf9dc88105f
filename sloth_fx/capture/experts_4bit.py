"""4-bit routed experts: :func:`quantize_experts` turns each routed-experts module's stacked
weights into bitsandbytes 4-bit ones, as ``load_in_4bit`` does for ``nn.Linear`` (and not for the
stacks: transformers' bitsandbytes path converts only ``nn.Linear``, so a Mixtral-8x7B's experts
stay ~87 GB of bf16 under ``load_in_4bit``).

The call order::

    model = get_peft_model(model, LoraConfig(..., target_parameters=["mlp.experts.gate_up_proj",
                                                                      "mlp.experts.down_proj"]))
    sloth_fx.quantize_experts(model)    # after PEFT: it reads each stack's 3-D shape when it wraps it
    model = sloth_fx.optimize(model)

A model whose dense stacks do not fit the GPU (a whole Mixtral-8x7B's are ~87 GB of bf16) is
loaded on the CPU and quantized onto the GPU one stack at a time, the rest moved after::

    sloth_fx.quantize_experts(model, device="cuda")   # each stack copied to the GPU, quantized there
    model.to("cuda")                                  # attention, norms, routers and the adapters

so that the GPU holds the 4-bit stacks and one dense stack at most, never the dense experts.

The contract of a quantized stack. ``W [E, out, in]`` (float32, float16 or bfloat16, frozen) is
quantized on its own device (or the one ``device`` names, a copy of it made there) by one
``bitsandbytes.functional.quantize_4bit`` call over the whole
contiguous stack: blocks of ``blocksize`` consecutive values, each scaled by its absolute maximum
(``absmax``) and coded on 4 bits (nf4 or fp4). ``out·in`` must be a multiple of ``blocksize``, so
that every block lies within one expert's matrix: expert ``e``'s codes and block scales are those
of ``quantize_4bit(W[e])``, and without ``compress_statistics``
``dequantize_4bit(stack)[e] == dequantize_4bit(*quantize_4bit(W[e]))`` bit for bit. With
``compress_statistics`` (double quantization, Params4bit's default) the scales are themselves
quantized to 8 bits, in blocks of 256 scales less their mean over the whole stack, as bitsandbytes
does for any one weight: the codes stay each expert's own, the scales' rounding is shared. The
result is a ``Params4bit`` (packed ``uint8``, frozen) whose ``quant_state.shape`` is ``[E, out, in]``
and whose ``quant_state.dtype`` is W's: the dtype the fused op and the module's forward compute in.

The module's forward becomes :class:`~sloth_fx.capture.dense_experts.DequantizedExperts`, so that
the model runs without sloth_fx too; ``sloth_fx.optimize`` runs the fused op on the 4-bit stacks.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sloth_fx.capture.dense_experts import DequantizedExperts
from sloth_fx.capture.experts_form import PROJECTIONS, adapter_mismatch, experts_layout
from sloth_fx.capture.routed_experts import routed_experts
from sloth_fx.kernels.toolkit import is_4bit

__all__ = ["quantize_experts", "quantize_stack"]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' 4-bit block sizes
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what bitsandbytes quantizes


def quantize_experts(model: nn.Module, quant_type: str = "nf4", *, compress_statistics: bool = True,
                     blocksize: int = 64, device: torch.device | str | None = None) -> list[str]:
    """Quantize every routed-experts module's ``gate_up_proj`` and ``down_proj`` stacks (the base
    module's, under PEFT's wrappers) to bitsandbytes 4-bit, in place, on their devices or on
    ``device`` (one stack at a time: module doc); the names of the parameters quantized, as
    ``model.named_parameters()`` gives them.

    Call it after ``peft.get_peft_model`` and before ``sloth_fx.optimize`` (module doc). Experts
    whose layout the fused op does not compute (GPT-OSS's biased, interleaved ones), or stored
    transposed, stay as they are, with a warning. Raises ValueError, before changing anything, for
    a ``quant_type`` other than nf4 or fp4, a ``blocksize`` bitsandbytes has not, a model with no
    routed experts the fused op computes, experts already quantized (PEFT's wrappers built on the
    packed storage are named so), a stack that requires grad (4-bit weights cannot train: put
    LoRA on them), one of another dtype than float32, float16 or bfloat16, one whose experts are
    not whole blocks (the module doc), or experts whose forward was replaced (sloth_fx's
    included: quantize before ``optimize``)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r}: 4-bit experts are one of {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize!r}: bitsandbytes quantizes blocks of {', '.join(map(str, BLOCKSIZES))}")
    target = None if device is None else torch.device(device)
    names = {module: name for name, module in model.named_modules()}
    stacks: list[tuple[nn.Module, nn.Module, str]] = []  # (the module called, the one holding the stack, name)
    left: list[str] = []
    for path, module in routed_experts(model):
        layout = experts_layout(module)
        if isinstance(layout, str) or getattr(layout.base, "is_transposed", False):
            left.append(f"{path} ({layout if isinstance(layout, str) else 'its stacks are stored transposed'})")
            continue
        for name in PROJECTIONS:
            refused = _refusal(getattr(layout.base, name), layout.wrappers.get(name), blocksize)
            if refused:
                raise ValueError(f"sloth_fx.quantize_experts: {names[layout.base]}.{name} {refused}")
        if "forward" in module.__dict__:
            raise ValueError(f"sloth_fx.quantize_experts: {path}'s forward is replaced "
                             f"({type(module.__dict__['forward']).__name__}): quantize before sloth_fx.optimize")
        stacks += [(module, layout.base, name) for name in PROJECTIONS]
    if not stacks:
        raise ValueError(f"sloth_fx.quantize_experts: {type(model).__name__} has no routed experts of the layout "
                         f"sloth_fx fuses{': ' + '; '.join(left) if left else ''}")
    if left:
        warnings.warn(f"sloth_fx.quantize_experts: experts left as they are: {'; '.join(left)}", stacklevel=2)
    for module, base, name in stacks:
        dense = getattr(base, name)
        # the stack itself is dropped as it is replaced: one dense copy on the target at a time
        setattr(base, name, quantize_stack(dense if target is None else dense.detach().to(target), quant_type,
                                           compress_statistics, blocksize))
        del dense
        module.forward = DequantizedExperts(module)
    return [f"{names[base]}.{name}" for _, base, name in stacks]


def quantize_stack(weight: torch.Tensor, quant_type: str, compress_statistics: bool,
                   blocksize: int) -> nn.Parameter:
    """``weight [E, out, in]`` as a frozen bitsandbytes ``Params4bit`` on its device (module doc)."""
    # bitsandbytes is imported here, where a weight is quantized: importing it costs every sloth_fx user
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=blocksize,
                                                 compress_statistics=compress_statistics, quant_type=quant_type)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=compress_statistics, quant_type=quant_type, bnb_quantized=True)


def _refusal(weight: torch.Tensor, wrapper: nn.Module | None, blocksize: int) -> str | None:
    """Why the stack ``weight`` (PEFT's ``wrapper`` around it, if any) cannot be quantized, or None."""
    if is_4bit(weight):
        mismatch = adapter_mismatch(wrapper, weight, False) if wrapper is not None else None
        return "is 4-bit already" + (f", under {mismatch}" if mismatch else "")
    if weight.requires_grad:
        return ("requires grad: 4-bit weights cannot train (a full finetune of them is impossible); freeze the "
                "stacks and put LoRA on them (peft.get_peft_model with target_parameters freezes them)")
    if weight.dtype not in _FLOAT_DTYPES:
        return f"is {weight.dtype}: bitsandbytes quantizes float32, float16 and bfloat16"
    _, out, inp = weight.shape
    if out * inp % blocksize:
        return (f"{tuple(weight.shape)}: an expert's {out}·{inp} values are not whole blocks of {blocksize}, so "
                f"blocks would straddle experts; pass a blocksize that divides {out * inp}")
    return None
