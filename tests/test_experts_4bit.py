"""4-bit routed experts (sloth_fx.quantize_experts) on tiny Mixtral and Qwen3-MoE with LoRA on
attention and on the experts: the optimized model trains as the same model with its stacks dense
(their dequantization: the numbers QLoRA defines), and so does the quantized model without
sloth_fx; explain names nf4; a refused call runs the module on its dequantized stacks, warned of.
Also the contract of a quantized stack, and quantize_experts' errors.
"""

import re
import warnings

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_routed_experts import moe_model
from tiny_models import assert_same_training_step, batch, tiny_model, twin
from torch import nn

import sloth_fx
from sloth_fx.capture import routed_experts as capture
from sloth_fx.capture.dense_experts import DequantizedExperts
from sloth_fx.capture.experts_4bit import quantize_stack
from sloth_fx.capture.routed_experts import UnfusedExpertsWarning
from sloth_fx.kernels.toolkit import Unsupported, dense_weight, is_4bit

LAYERS = 2  # of the tiny models: two stacks each


def dequantized_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose 4-bit stacks are dense parameters of their dequantization, run by
    the experts' own forward: the reference that QLoRA defines."""
    reference = twin(model)
    for module in reference.modules():
        if isinstance(module.__dict__.get("forward"), DequantizedExperts):
            del module.forward
        for name, p in list(module.named_parameters(recurse=False)):
            if is_4bit(p):
                setattr(module, name, nn.Parameter(dense_weight(p, p.quant_state.dtype), requires_grad=False))
    return reference


def quantized_stacks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if is_4bit(p)}


@pytest.mark.usefixtures("reference_ops")
@pytest.mark.parametrize("family,checkpointing", [("mixtral", True), ("qwen3_moe", False)])
def test_4bit_experts_train_as_their_dequantization_with_and_without_sloth_fx(family, checkpointing):
    model = moe_model(family, lora=True, checkpointing=checkpointing)
    routers = [p.requires_grad_() for name, p in model.named_parameters() if ".mlp.gate." in name]
    assert len(routers) == LAYERS  # the router trains too: its gradient goes through the experts' backward
    names = sloth_fx.quantize_experts(model)
    assert sorted(names) == sorted(quantized_stacks(model)) and len(names) == 2 * LAYERS
    assert all(name.endswith(("experts.base_layer.base_layer.gate_up_proj", "experts.base_layer.base_layer.down_proj"))
               for name in names)
    reference = dequantized_twin(model)
    optimized = sloth_fx.optimize(twin(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_same_training_step(reference, model, batch())  # without sloth_fx: the same numbers
        assert_same_training_step(reference, optimized, batch())
    assert not [w for w in caught if issubclass(w.category, UnfusedExpertsWarning)]
    for trained in (model, optimized):  # still 4-bit after the calls, and never given a gradient
        stacks = quantized_stacks(trained)
        assert len(stacks) == 2 * LAYERS and all(p.grad is None for p in stacks.values())
    text = sloth_fx.explain(optimized)
    assert re.search(r"routed experts mlp\.experts: fused op in \d+ forward calls "
                     r"\(4 experts, silu, nf4, LoRA folded in \(gate_up r=4, down r=4\)", text), text


@pytest.mark.usefixtures("reference_ops")
def test_a_refused_call_runs_the_module_on_its_dequantized_stacks_with_a_warning(monkeypatch):
    model = moe_model("mixtral", lora=True, checkpointing=False)
    sloth_fx.quantize_experts(model)
    reference = dequantized_twin(model)
    optimized = sloth_fx.optimize(twin(model))

    def refuse(*args, **kwargs):
        raise Unsupported("routed_experts", "refused for the test")

    monkeypatch.setattr(capture, "fused_routed_experts", refuse)
    with pytest.warns(UnfusedExpertsWarning, match="refused for the test"):
        assert_same_training_step(reference, optimized, batch())
    assert len(quantized_stacks(optimized)) == 2 * LAYERS  # put back after each call
    assert re.search(r"as transformers runs them in \d+ forward calls: refused for the test",
                     sloth_fx.explain(optimized))


@pytest.mark.parametrize("double_quant", [False, True])
def test_every_block_is_one_experts_so_their_codes_are_each_experts_own(double_quant):
    """One quantize_4bit call over the stack: without double quantization its dequantization is
    each expert's own, bit for bit; with it, the 4-bit codes still are (the scales' 8-bit rounding
    is shared by the stack)."""
    stack = torch.randn(3, 48, 40, generator=torch.Generator().manual_seed(0)).bfloat16()  # 1920 = 30 blocks of 64
    packed = quantize_stack(stack, "nf4", double_quant, 64)
    assert tuple(packed.quant_state.shape) == (3, 48, 40) and packed.quant_state.dtype == torch.bfloat16
    alone = [bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
             for w in stack]
    assert torch.equal(packed.data, torch.cat([codes for codes, _ in alone]))
    if not double_quant:
        each = torch.stack([bnb.functional.dequantize_4bit(*q) for q in alone])
        assert torch.equal(dense_weight(packed, torch.bfloat16), each)


def test_quantize_experts_refuses_with_the_reason_and_changes_nothing():
    model = moe_model("mixtral", lora=True, checkpointing=False)
    for kwargs, message in ((dict(quant_type="int4"), "quant_type 'int4'"), (dict(blocksize=48), "blocksize 48"),
                            (dict(blocksize=4096), r"an expert's 64·96 values are not whole blocks of 4096")):
        with pytest.raises(ValueError, match=message):
            sloth_fx.quantize_experts(model, **kwargs)
    with pytest.raises(RuntimeError, match="nope"):  # torch names the device string it cannot read
        sloth_fx.quantize_experts(model, device="nope")
    assert not quantized_stacks(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no routed experts"):
        sloth_fx.quantize_experts(tiny_model("llama"))
    with pytest.raises(ValueError, match="GptOssExperts: has_bias=True"):
        sloth_fx.quantize_experts(moe_model("gpt_oss", lora=False, checkpointing=False))
    with pytest.raises(ValueError, match="gate_up_proj requires grad: 4-bit weights cannot train"):
        sloth_fx.quantize_experts(moe_model("mixtral", lora=False, checkpointing=False))
    with pytest.raises(ValueError, match=r"forward is replaced \(FusedExperts\): quantize before sloth_fx.optimize"):
        sloth_fx.quantize_experts(sloth_fx.optimize(twin(model)))
    sloth_fx.quantize_experts(model)
    with pytest.raises(ValueError, match="gate_up_proj is 4-bit already$"):
        sloth_fx.quantize_experts(model)


@pytest.mark.usefixtures("reference_ops")
def test_stacks_quantized_before_peft_are_named_as_the_wrong_order():
    """PEFT reads a stack's shape when it wraps it: on packed storage its adapters fit no expert."""
    model = moe_model("mixtral", lora=False, checkpointing=False)
    model.requires_grad_(False)
    sloth_fx.quantize_experts(model)
    model = get_peft_model(model, LoraConfig(r=4, target_parameters=["mlp.experts.gate_up_proj"]))
    order = "PEFT wrapped the packed 4-bit storage; call sloth_fx.quantize_experts after get_peft_model"
    with pytest.raises(ValueError, match=f"is 4-bit already, under an adapter for 1 experts .*{order}"):
        sloth_fx.quantize_experts(model)
    optimized = sloth_fx.optimize(model)
    with pytest.raises(ValueError, match=order), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfusedExpertsWarning)  # refused first: the fallback then raises
        optimized(**batch())


def test_4bit_stacks_stored_transposed_are_refused_by_their_layout():
    """The op reads a transposed dense stack through a view; a 4-bit one has none, so the layout
    (read once per module) refuses it by name, and a dense transposed one is not refused."""
    from sloth_fx.capture.experts_form import experts_layout

    model = moe_model("mixtral", lora=True, checkpointing=False)
    experts = model.base_model.model.model.layers[0].mlp.experts
    base = experts.get_base_layer()
    base.is_transposed = True
    assert not isinstance(experts_layout(experts), str)
    base.down_proj = quantize_stack(base.down_proj, "nf4", True, 64)
    assert experts_layout(experts) == "MixtralExperts: 4-bit down_proj stored transposed ([E, in, out])"


@pytest.mark.gpu
def test_stacks_on_the_cpu_are_quantized_onto_the_gpu_one_at_a_time():
    """A model loaded on the CPU (its dense stacks too large for the GPU) gets its stacks 4-bit on
    the GPU with ``device``: the GPU never holds more than one dense stack beside the 4-bit ones,
    the rest of the model stays where it was, and once moved the model trains as one quantized on
    the GPU."""
    model = moe_model("mixtral", lora=True, checkpointing=False)
    on_gpu = twin(model).cuda()
    sloth_fx.quantize_experts(on_gpu)
    dense_bytes = [p.numel() * p.element_size() for name, p in model.named_parameters() if name.endswith("_proj")
                   and p.dim() == 3]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    names = sloth_fx.quantize_experts(model, device="cuda")
    stacks = quantized_stacks(model)
    assert sorted(names) == sorted(stacks) and all(p.is_cuda for p in stacks.values())
    assert all(not p.is_cuda for name, p in model.named_parameters() if name not in stacks)
    held = sum(p.numel() * p.element_size() for p in stacks.values())
    assert torch.cuda.max_memory_allocated() - before <= held + max(dense_bytes) + 2**20
    assert all(torch.equal(p, quantized_stacks(on_gpu)[name]) for name, p in stacks.items())  # the same codes
    inputs = {k: v.cuda() for k, v in batch().items()}
    assert_same_training_step(on_gpu, model.cuda(), inputs)  # tolerances: index_add_ sums in any order on CUDA
