"""Demo: a small random-init Llama with LoRA, trained a few steps plain and after ``optimize``.

    python -m sloth_fx.demo [--steps 6] [--layers 4] [--hidden 256] [--seq 256]

Prints the rewrite report and, beside each other, the losses, the step time and the peak memory
of the plain and the optimized model. On a CPU-only machine the fused ops run their plain-PyTorch
references, so the times there say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings

import torch

# Other libraries' notices that say nothing about this demo: bitsandbytes (imported by PEFT) logs
# at import, on CPUs with AVX512-BF16, that its optional CPU 4-bit kernel package is missing (the
# demo has no 4-bit layer); PEFT still asks transformers 5.2x for ``is_gradient_checkpointing``,
# which warns that the name is deprecated.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import sloth_fx  # noqa: E402


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
        vocab_size=args.vocab,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device, dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model.config.use_cache = False  # training: no KV cache (HF would say so once per model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=targets))
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def train(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> tuple[list[float], float, float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for ids in batches:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    return losses, steady, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(args.steps)]

    plain = build(args, device, dtype)
    fast = sloth_fx.optimize(copy.deepcopy(plain))
    plain_losses, plain_time, plain_peak = train(plain, batches, device)
    fast_losses, fast_time, fast_peak = train(fast, batches, device)

    print(sloth_fx.explain(fast))
    print(f"\ndevice {device}, {dtype}, {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}")
    print(f"{'step':>4} {'plain loss':>11} {'sloth_fx loss':>14}")
    for i, (a, b) in enumerate(zip(plain_losses, fast_losses)):
        print(f"{i:>4} {a:>11.5f} {b:>14.5f}")
    if device.type == "cuda":
        print(f"median step time: plain {plain_time * 1e3:.1f} ms, sloth_fx {fast_time * 1e3:.1f} ms (first step excluded)")
        print(f"peak GPU memory: plain {plain_peak:.2f} GiB, sloth_fx {fast_peak:.2f} GiB")
    else:
        print("step time and memory: not compared on the CPU, where the fused ops run their plain-PyTorch references")


if __name__ == "__main__":
    main()
