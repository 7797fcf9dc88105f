"""The LoRA per-projection table on a fake result set (the measurements themselves need the GPU)."""

from benchmarks.lora_plans import PROJECTIONS, lora_plans_table


def _row(form, fwd_bwd, picked, status="ok"):
    row = {"base": "bf16", "in": 4096, "out": 1024, "form": form, "projections": "k, v", "model": "Mistral-7B",
           "predicted_fwd_ms": 0.5, "predicted_dx_ms": 0.25, "picked": picked, "status": status, "reason": "OOM x"}
    return dict(row, fwd_ms=fwd_bwd / 3, fwd_bwd_ms=fwd_bwd) if status == "ok" else row


def test_table_marks_the_pick_and_the_measured_fastest_fused_form():
    rows = [_row("peft", 1.0, False), _row("factored", 2.0, True), _row("merged", 1.5, False)]
    lines = lora_plans_table(rows).splitlines()
    assert len(lines) == 2 + 3
    by_form = {l.split("|")[3].strip(): [c.strip() for c in l.split("|")[1:-1]] for l in lines[2:]}
    assert by_form["factored"][7:] == ["yes", ""]  # picked, not the fastest
    assert by_form["merged"][7:] == ["", "yes"]  # the fastest fused form (PEFT is not a candidate)
    assert by_form["peft"][7:] == ["", ""]
    assert by_form["merged"][3:5] == ["0.500", "1.500"]


def test_failed_form_keeps_its_reason_and_is_no_candidate():
    rows = [_row("peft", 1.0, False), _row("factored", 2.0, True), _row("merged", 0, False, status="failed")]
    lines = lora_plans_table(rows).splitlines()
    merged = next(l for l in lines if "| merged |" in l)
    assert "OOM x" in merged and merged.rstrip().endswith("|  |")
    assert "| factored |" in next(l for l in lines if l.rstrip().endswith("| yes | yes |"))


def test_projections_cover_both_models_once():
    shapes = [(i, o) for _, _, i, o in PROJECTIONS]
    assert len(shapes) == len(set(shapes))
    assert {(4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)} == set(shapes)
