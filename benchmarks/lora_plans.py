"""Per projection: PEFT's LoRA linear against each form of the fused op, with the cost model beside.

    python -m benchmarks lora-plans --results DIR

For every distinct projection of Llama-2-7B and Mistral-7B (``in -> out``), at T = 16384 tokens,
r = 16, PEFT's default fp32 adapters, over a bf16 base and over an nf4 (bitsandbytes, double
quantised) base, it times forward and forward+backward (``triton.testing.do_bench`` medians) of:

- ``peft``: PEFT's own layer (``peft.tuners.lora`` ``Linear`` / ``bnb.Linear4bit``), as HF runs it;
- ``factored`` and ``merged``: :func:`sloth_fx.kernels.lora.lora_linear` with that plan for the
  forward product and for dX (see :mod:`sloth_fx.kernels.lora_plan`).

Beside each, :func:`sloth_fx.kernels.lora_plan.lora_plan` at the same shapes and the device's measured
rates: the predicted forward and dX seconds of that form, and the form it picks. The prediction
covers what differs between the forms (the dense base is not charged for dequantisation, and
``dY·B``, dA and dB, common to all forms, are left out of dX), so the backward is compared by
its ordering, not its absolute time. ``lora_plans.json`` holds the rows; the report renders them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.e2e import classify_failure
from benchmarks.kernels import _bench

TOKENS, RANK, ALPHA = 16384, 16, 16
#: (model, projection names, in, out)
PROJECTIONS = [
    ("Llama-2-7B + Mistral-7B", "q, o (both); k, v (Llama)", 4096, 4096),
    ("Mistral-7B", "k, v", 4096, 1024),
    ("Llama-2-7B", "gate, up", 4096, 11008),
    ("Llama-2-7B", "down", 11008, 4096),
    ("Mistral-7B", "gate, up", 4096, 14336),
    ("Mistral-7B", "down", 14336, 4096),
]
FORMS = ("peft", "factored", "merged")


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

    return {"peft": layer, "factored": fused("factored"), "merged": fused("merged")}


def measure_projection(in_f: int, out_f: int, base: str, device: torch.device) -> list[dict[str, Any]]:
    """One row per form: measured forward / forward+backward ms and the cost model's view."""
    from sloth_fx.kernels.lora_plan import lora_plan
    from sloth_fx.kernels.roofline import measure_device_rates

    plan = lora_plan(TOKENS, in_f, out_f, RANK, 2, measure_device_rates(device), adapter_elem_bytes=4)
    layer = peft_layer(in_f, out_f, base, device)
    x = torch.randn(TOKENS, in_f, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TOKENS, out_f, device=device, dtype=torch.bfloat16)
    leaves = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    rows = []
    for form, fn in _forms(layer).items():
        row: dict[str, Any] = {"base": base, "in": in_f, "out": out_f, "form": form,
                               "predicted_fwd_ms": plan.predicted[f"forward {form}"] * 1e3,
                               "predicted_dx_ms": plan.predicted[f"dX {form}"] * 1e3,
                               "picked": form == plan.forward == plan.backward_dx, "reason": plan.reason}
        try:
            with torch.no_grad():
                row["fwd_ms"] = _bench(lambda: fn(x))
            row["fwd_bwd_ms"] = _bench(lambda: torch.autograd.backward(fn(x), dy), grad_to_none=leaves)
            row["status"] = "ok"
        except Exception as e:  # an unsupported form on this base: the row says why
            row.update(status="failed", reason=classify_failure(e))
        rows.append(row)
    del layer, x, dy
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


def lora_plans_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per base and projection, each form's measured and predicted times, the pick."""
    head = ("| base | in->out (projections) | form | fwd ms | fwd+bwd ms | predicted fwd ms | predicted dX ms "
            "| cost model's pick | measured fastest (fwd+bwd) |")
    lines = [head, "|" + " --- |" * 9]
    for key in dict.fromkeys((r["base"], r["in"], r["out"]) for r in rows):
        group = [r for r in rows if (r["base"], r["in"], r["out"]) == key]
        ok = [r for r in group if r["status"] == "ok" and r["form"] != "peft"]
        fastest = min(ok, key=lambda r: r["fwd_bwd_ms"])["form"] if ok else "—"
        for r in group:
            measured = (f"{r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f}" if r["status"] == "ok"
                        else f"{r['reason'][:60]} | —")
            lines.append(f"| {r['base']} | {r['in']}->{r['out']} ({r['projections']}) | {r['form']} | {measured} "
                         f"| {r['predicted_fwd_ms']:.3f} | {r['predicted_dx_ms']:.3f} | {'yes' if r['picked'] else ''} "
                         f"| {'yes' if r['form'] == fastest else ''} |")
    return "\n".join(lines)
