"""The progress bar of the e2e runs, on a stream that is a terminal and on one that is not."""

import io
import json
import sys

from rich.console import Console

from benchmarks import runner
from benchmarks.progress import RunBar


def _command(system, cfg, out):
    row = {"system": system, "config": cfg, "status": "ok", "tokens_per_s": 5.0, "losses": [1.0]}
    return [sys.executable, "-c", f"open({str(out)!r}, 'w').write({json.dumps(row)!r})"]


def _run(tmp_path, terminal):
    out = io.StringIO()
    con = Console(file=out, force_terminal=terminal, width=200, highlight=False, markup=False)
    rows = runner.run_suite(["hf", "x"], ["E1", "R1[layers=2]"], tmp_path, timeout=60, command=_command,
                            progress=con.log, bar=RunBar(con))
    assert [r["status"] for r in rows] == ["ok"] * 4
    return out.getvalue()


def test_off_a_terminal_each_run_logs_plain_lines(tmp_path):
    text = _run(tmp_path, terminal=False)
    assert "\r" not in text and "\x1b" not in text  # no redraws, no control codes in a log
    for i, run in enumerate(["E1 hf", "E1 x", "R1[layers=2] hf", "R1[layers=2] x"], 1):
        assert f"[{i}/4] {run} (timeout 60 s)" in text  # the runner's lines are all there
        assert f"runs {i}/4 done" in text
    assert text.count("-> 5 tokens/s") == 4
    lines = text.splitlines()
    assert lines.index(next(l for l in lines if "runs 1/4 done" in l)) > lines.index(next(l for l in lines if "[1/4]" in l))


def test_on_a_terminal_the_bar_keeps_the_lines(tmp_path):
    text = _run(tmp_path, terminal=True)
    for i, run in enumerate(["E1 hf", "E1 x", "R1[layers=2] hf", "R1[layers=2] x"], 1):
        assert f"[{i}/4] {run} (timeout 60 s)" in text
    assert text.count("-> 5 tokens/s") == 4
    assert "4/4" in text and "━" in text  # the bar, drawn to its end
    assert "runs 1/4 done" not in text  # the bar replaces the plain lines
    assert json.loads((tmp_path / "e2e_E1_x.json").read_text())["status"] == "ok"
