"""The LoRA pass over bitsandbytes 4-bit bases (QLoRA) on a tiny Llama: PEFT's loss and every
adapter gradient, siblings grouped, every layer's capture rewritten, and refusals by name."""

import bitsandbytes as bnb
import pytest
import torch
from tiny_models import assert_refused_unchanged, assert_same_training_step, batch, tiny_model, twin, wrong_norm_pass
from torch import nn

import sloth_fx


def qlora_model(quant_type: str, double_quant: bool, *, checkpointing: bool = False, dtype: torch.dtype = torch.float32,
                compute_dtype: torch.dtype | None = None, dropout: float = 0.0, layers: int = 2) -> nn.Module:
    """A tiny Llama whose decoder linears are bitsandbytes ``Linear4bit`` (as ``load_in_4bit``
    leaves them), under PEFT LoRA on all seven projections with non-zero B."""

    def quantize(model: nn.Module) -> nn.Module:
        for layer in model.model.layers:
            for name, mod in list(layer.named_modules()):
                if type(mod) is not nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=compute_dtype or dtype,
                                      compress_statistics=double_quant, quant_type=quant_type, device="meta")
                q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=double_quant,
                                             quant_type=quant_type, module=q)
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, q.to("cpu"))  # .to() quantizes
        model.is_loaded_in_4bit = True  # PEFT puts its bnb LoRA layers on Linear4bit only then
        return model

    return tiny_model("llama", lora=True, checkpointing=checkpointing, layers=layers, dtype=dtype, prepare=quantize,
                      lora_dropout=dropout)


def rewrites_per_capture(model: nn.Module) -> list[int]:
    """LoRA rewrites in each capture of the decoder layers. Without checkpointing the first layer,
    whose input needs no grad, has a graph of its own, where bitsandbytes calls its op outside
    MatMul4Bit for q, k and v; with it, HF makes the embeddings' output require grad: one graph."""
    region = sloth_fx.report(model).regions["LlamaDecoderLayer"]
    return [sum(len(log.rewrites) for log in cap.logs if log.pass_name == "lora") for cap in region.captures]


# Each value of quant type, double quantization and checkpointing twice, every pair of them once.
@pytest.mark.parametrize("quant_type,double_quant,checkpointing", [
    ("nf4", True, False), ("nf4", False, True), ("fp4", True, True), ("fp4", False, False)])
def test_qlora_on_all_seven_projections(quant_type, double_quant, checkpointing):
    original = qlora_model(quant_type, double_quant, checkpointing=checkpointing)
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    assert_same_training_step(original, optimized, batch())
    report = sloth_fx.report(optimized)
    assert report.count("lora") == 7 * 2 and report.refusals("lora") == []
    assert rewrites_per_capture(optimized) == ([7] if checkpointing else [7, 7])
    text = sloth_fx.explain(optimized)
    assert "x read once for 3 linears" in text and "x read once for 2 linears" in text
    assert "64->96, r=4" in text and "96->64, r=4" in text  # the quantized shape, not the packed uint8 one


def test_qlora_bf16_with_fp32_adapters():
    """PEFT keeps fp32 adapters on a bf16 model and casts their term to bf16 before the sum."""
    original = qlora_model("nf4", True, dtype=torch.bfloat16)
    assert original.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    optimized = sloth_fx.optimize(twin(original), passes=["lora"])
    assert_same_training_step(original, optimized, batch(), rtol=2e-2, atol=2e-3)
    assert sloth_fx.report(optimized).count("lora") == 14 and rewrites_per_capture(optimized) == [7, 7]


def test_qlora_passes_verify(scratch_passes):
    """verify runs both graphs on the real 4-bit weights and quant states and random activations:
    the LoRA rewrite is kept, a wrong one after it is still caught, and the model trains as PEFT's."""
    sloth_fx.register_pass("wrong_norm_for_qlora_test", wrong_norm_pass)
    original = qlora_model("nf4", True)
    optimized = sloth_fx.optimize(twin(original), passes=["lora", "wrong_norm_for_qlora_test"], verify=True)
    assert_same_training_step(original, optimized, batch())
    assert sloth_fx.report(optimized).count("lora") == 14
    text = sloth_fx.explain(optimized)
    assert "each pass checked on random inputs" in text and "dropped by verify: lora" not in text
    assert "dropped by verify: wrong_norm_for_qlora_test" in text


@pytest.mark.parametrize("kwargs,reason", [
    (dict(dropout=0.1), "lora_dropout p=0.1"),
    (dict(compute_dtype=torch.bfloat16), "bitsandbytes compute dtype torch.bfloat16 is not the input's torch.float32"),
])
def test_qlora_refusals_by_name(kwargs, reason):
    report = assert_refused_unchanged(qlora_model("nf4", True, layers=1, **kwargs), "lora")
    refused = [r for r in report.refusals("lora") if reason in r.reason]
    assert len(refused) == 7, report.refusals("lora")
