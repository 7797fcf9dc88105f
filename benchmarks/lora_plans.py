"""Per projection: PEFT's LoRA linear against each form of the fused op, with the cost model beside.

    python -m benchmarks lora-plans --results DIR

For every distinct projection of Llama-2-7B and Mistral-7B (``in -> out``), r = 16, over a bf16
base and over an nf4 (bitsandbytes, double quantised) base, with PEFT's default fp32 adapters and
with bf16 ones, at T = 16384 tokens (E1's step) and T = 2200 (a packed R1p step, host-bound: its
rank-r products run as PyTorch), it times forward and forward+backward (``triton.testing.do_bench``
medians) of:

- ``peft``: PEFT's own layer (``peft.tuners.lora`` ``Linear`` / ``bnb.Linear4bit``), as HF runs it;
- ``factored``, ``merged`` and ``stacked``: :func:`sloth_fx.kernels.lora.lora_linear` with that
  plan for the forward product and for dX (see :mod:`sloth_fx.kernels.lora_plan`; forced, so
  stacked and merged run with fp32 adapters too, rounded to bf16, which the cost model would not
  pick).

Beside each, :func:`sloth_fx.kernels.lora_plan.lora_plan` at the same shapes and the device's measured
rates: the predicted forward and dX seconds of that form, and the form it picks for each (one
linear alone: no siblings share its ``x``). The prediction covers what differs between the forms
(the nf4 base is not charged for its dequantisation, and dA and dB, common to all forms, are left
out of dX), so the backward is compared by its ordering, not its absolute time.
``lora_plans.json`` holds the rows; the report renders them. Each timing runs for about 40 ms, so
the 384 timings take about a minute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.e2e import classify_failure

TOKENS = (16384, 2200)  # E1's step; a packed R1p step
RANK, ALPHA = 16, 16
#: (model, projection names, in, out)
PROJECTIONS = [
    ("Llama-2-7B + Mistral-7B", "q, o (both); k, v (Llama)", 4096, 4096),
    ("Mistral-7B", "k, v", 4096, 1024),
    ("Llama-2-7B", "gate, up", 4096, 11008),
    ("Llama-2-7B", "down", 11008, 4096),
    ("Mistral-7B", "gate, up", 4096, 14336),
    ("Mistral-7B", "down", 14336, 4096),
]
FORMS = ("peft", "factored", "merged", "stacked")
ADAPTERS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _bench(fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds by ``triton.testing.do_bench``, over ~40 ms of runs (the budget of 384 timings)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median"))


def peft_layer(in_f: int, out_f: int, base: str, device: torch.device) -> nn.Module:
    """PEFT's LoRA layer over a bf16 ``nn.Linear`` or an nf4 ``bnb.nn.Linear4bit``, random B."""
    from peft import LoraConfig, get_peft_model

    linear = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    if base == "nf4":
        import bitsandbytes as bnb

        quantized = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                      compress_statistics=True)
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
        linear = quantized
    model = get_peft_model(nn.Sequential(linear).to(device), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"]))
    layer = model.base_model.model[0]
    nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def _forms(layer: nn.Module) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from sloth_fx.kernels.lora import lora_linear
    from sloth_fx.kernels.lora_plan import LoRAPlan

    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]

    def fused(form: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: lora_linear(x, w, a, b, s, plan=LoRAPlan(form, form))

    return {"peft": layer, **{form: fused(form) for form in FORMS[1:]}}


def measure_projection(in_f: int, out_f: int, base: str, device: torch.device) -> list[dict[str, Any]]:
    """One row per adapters' dtype, token count and form: measured forward / forward+backward ms
    and the cost model's view."""
    from sloth_fx.kernels.lora_plan import lora_plan
    from sloth_fx.kernels.roofline import measure_device_rates

    layer = peft_layer(in_f, out_f, base, device)
    rows = []
    for adapters, dtype in ADAPTERS.items():
        layer.lora_A.to(dtype)
        layer.lora_B.to(dtype)
        leaves = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        for tokens in TOKENS:
            plan = lora_plan(tokens, in_f, out_f, RANK, 2, measure_device_rates(device),
                             adapter_elem_bytes=dtype.itemsize, base_4bit=base == "nf4")
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(tokens, out_f, device=device, dtype=torch.bfloat16)
            for form, fn in _forms(layer).items():
                picked_for = [name for name, pick in (("forward", plan.forward), ("dX", plan.backward_dx)) if pick == form]
                row: dict[str, Any] = {"base": base, "adapters": adapters, "tokens": tokens, "in": in_f, "out": out_f,
                                       "form": form, "predicted_fwd_ms": plan.predicted[f"forward {form}"] * 1e3,
                                       "predicted_dx_ms": plan.predicted[f"dX {form}"] * 1e3,
                                       "picked": len(picked_for) == 2, "picked_for": " and ".join(picked_for),
                                       "reason": plan.reason}
                try:
                    with torch.no_grad():
                        row["fwd_ms"] = _bench(lambda: fn(x))
                    row["fwd_bwd_ms"] = _bench(lambda: torch.autograd.backward(fn(x), dy), grad_to_none=[x, *leaves])
                    row["status"] = "ok"
                except Exception as e:  # an unsupported form on this base: the row says why
                    row.update(status="failed", reason=classify_failure(e))
                rows.append(row)
            del x, dy
    del layer
    torch.cuda.empty_cache()
    return rows


def run_lora_plans(progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every projection over both bases; the rows, each with its model and projection names."""
    device = torch.device("cuda")
    rows = []
    for base in ("bf16", "nf4"):
        for model, names, in_f, out_f in PROJECTIONS:
            if progress:
                progress(f"lora-plans {base} {in_f}->{out_f} ({model}: {names})")
            rows += [dict(r, model=model, projections=names) for r in measure_projection(in_f, out_f, base, device)]
    return rows


def _setting(row: dict[str, Any]) -> str:
    """The base, and the adapters' dtype and the token count where the row has them."""
    extra = [f"{row['adapters']} adapters" if "adapters" in row else "", f"T={row['tokens']}" if "tokens" in row else ""]
    return ", ".join([row["base"], *filter(None, extra)])


def lora_plans_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per setting and projection, each form's measured and predicted times, the pick."""
    head = ("| base | in->out (projections) | form | fwd ms | fwd+bwd ms | predicted fwd ms | predicted dX ms "
            "| cost model's pick | measured fastest (fwd+bwd) |")
    lines = [head, "|" + " --- |" * 9]
    for key in dict.fromkeys((_setting(r), r["in"], r["out"]) for r in rows):
        group = [r for r in rows if (_setting(r), r["in"], r["out"]) == key]
        ok = [r for r in group if r["status"] == "ok" and r["form"] != "peft"]
        fastest = min(ok, key=lambda r: r["fwd_bwd_ms"])["form"] if ok else "—"
        for r in group:
            measured = (f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f}" if r["status"] == "ok"
                        else f"{r['reason'][:60]} | —")
            pick = "yes" if r["picked"] else r.get("picked_for", "")
            lines.append(f"| {_setting(r)} | {r['in']}->{r['out']} ({r['projections']}) | {r['form']} | {measured} "
                         f"| {r['predicted_fwd_ms']:.3f} | {r['predicted_dx_ms']:.3f} | {pick} "
                         f"| {'yes' if r['form'] == fastest else ''} |")
    return "\n".join(lines)
