"""Host time against GPU time per call of the fused ops, forward and backward.

    python -m benchmarks.host_overhead [--tokens 2048 16384] [--ops qkv down rmsnorm rope swiglu ce]
        [--kernels DIR] [--save F | --compare F] [--profile F]

Llama-2-7B shapes, bf16: the LoRA op with fp32 adapters of rank 16 (PEFT's defaults) on the q/k/v
group (in 4096, three outs of 4096) and a single down_proj (in 11008, out 4096); RMSNorm (hidden
4096, frozen weight, Llama's rounding); RoPE on q and k (32 heads of 128, HF's transposed views);
SwiGLU (intermediate 11008); the fused lm_head + cross-entropy (vocab 32000, frozen head).
``--kernels DIR`` runs the ops of another checkout's ``kernels/`` (an older commit, say) as
``sloth_fx.kernels``. Per call:

- ``host``: seconds the Python thread spends issuing one call (forward: ``lora_linear_group``;
  backward: ``torch.autograd.grad`` through it), measured while the GPU is held busy by a sleep
  kernel, so that nothing waits on the GPU;
- ``gpu``: CUDA-event time of the same calls queued behind that sleep: the GPU's own work, with
  no gaps left by the host;
- ``wall``: synchronised wall-clock time per call of back-to-back calls: ``max(host, gpu)``
  when they overlap well.

A call is host-bound when ``host > gpu``. ``--save`` writes every output and gradient of fixed
inputs, ``--compare`` checks another implementation's against them bit for bit (``torch.equal``).
``--profile`` writes cProfile's top functions (by own time) over forward+backward calls of each
op at the first token count. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import importlib.machinery
import importlib.util
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, RANK, SCALE = 4096, 11008, 16, 2.0
HEADS, HEAD_DIM, VOCAB = 32, 128, 32000
GROUPS = {"qkv": (HIDDEN, [HIDDEN] * 3), "down": (INTERMEDIATE, [HIDDEN])}
OPS = [*GROUPS, "rmsnorm", "rope", "swiglu", "ce"]


def use_kernels(root: Path) -> None:
    """Import ``root`` (a ``kernels/`` folder) as ``sloth_fx.kernels``, before anything imports it.

    The parent package is this checkout's ``sloth_fx`` without running its ``__init__`` (the API,
    passes and transformers), which the kernels never import."""
    if "sloth_fx" not in sys.modules:
        parent = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("sloth_fx", None, is_package=True))
        parent.__path__ = [str(Path(__file__).resolve().parent.parent / "sloth_fx")]
        sys.modules["sloth_fx"] = parent
    spec = importlib.util.spec_from_file_location("sloth_fx.kernels", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sloth_fx.kernels"] = module
    spec.loader.exec_module(module)


def kernel(name: str):
    return importlib.import_module(f"sloth_fx.kernels.{name}")


def make(op: str, tokens: int, seed: int = 0) -> tuple[Callable[[], object], list[torch.Tensor], list[torch.Tensor]]:
    """``(forward, leaves, output gradients)`` of ``op`` at ``tokens``, inputs from ``seed``:
    ``forward()`` returns the op's output(s), the gradients are those of the leaves."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")

    def randn(*shape, dtype=torch.bfloat16, std=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dtype)

    if op in GROUPS:
        in_f, outs = GROUPS[op]
        x = randn(tokens, in_f).requires_grad_()
        ws = [randn(o, in_f, std=in_f ** -0.5) for o in outs]
        as_ = [randn(RANK, in_f, dtype=torch.float32, std=in_f ** -0.5).requires_grad_() for _ in outs]
        bs = [randn(o, RANK, dtype=torch.float32, std=0.1).requires_grad_() for o in outs]
        lora = kernel("lora")
        return (lambda: lora.lora_linear_group(x, ws, as_, bs, [SCALE] * len(ws)), [x, *as_, *bs],
                [randn(tokens, o) for o in outs])
    if op == "rmsnorm":  # LoRA leaves the norm weight frozen
        x, w = randn(tokens, HIDDEN).requires_grad_(), 1.0 + randn(HIDDEN, std=0.1)
        rms = kernel("rmsnorm")
        return lambda: rms.rmsnorm(x, w, 1e-5, normed_dtype=torch.bfloat16), [x], [randn(tokens, HIDDEN)]
    if op == "rope":  # HF's layout: projections viewed [B, S, H, D], then transposed
        q, k, dq, dk = (randn(1, tokens, HEADS, HEAD_DIM).transpose(1, 2) for _ in range(4))
        q.requires_grad_(), k.requires_grad_()
        ang = torch.outer(torch.arange(tokens, device=dev, dtype=torch.float32),
                          10000.0 ** (-torch.arange(0, HEAD_DIM, 2, device=dev) / HEAD_DIM))
        emb = torch.cat([ang, ang], dim=-1)[None]
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        rope = kernel("rope")
        return lambda: rope.rope(q, k, cos, sin), [q, k], [dq, dk]
    if op == "swiglu":
        gate, up = (randn(tokens, INTERMEDIATE).requires_grad_() for _ in range(2))
        swiglu = kernel("gated_mlp")
        return lambda: swiglu.gated_mlp(gate, up), [gate, up], [randn(tokens, INTERMEDIATE)]
    if op == "ce":  # the head is frozen in LoRA
        hidden, weight = randn(tokens, HIDDEN).requires_grad_(), randn(VOCAB, HIDDEN, std=HIDDEN ** -0.5)
        labels = torch.randint(0, VOCAB, (tokens,), generator=g, device=dev)
        labels[::7] = -100
        ce = kernel("cross_entropy")
        return lambda: ce.linear_cross_entropy(hidden, weight, labels), [hidden], [torch.ones((), device=dev)]
    raise ValueError(op)


def _tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _sleep_for(seconds: float) -> None:
    """Hold the GPU busy for about ``seconds`` (its clock is ~1.7-2 GHz)."""
    torch.cuda._sleep(int(seconds * 2.0e9))


def time_calls(issue, calls: int, host_hint: float, prepare=lambda: None) -> dict[str, float]:
    """host, gpu and wall milliseconds per call of ``issue(k)`` for k in range(calls);
    ``prepare()`` runs (untimed) before each of the two timed passes."""
    prepare()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sleep_for(2.0 * calls * host_hint + 0.05)  # the GPU stays busy while the host issues every call
    start.record()
    t0 = time.perf_counter()
    for k in range(calls):
        issue(k)
    host = (time.perf_counter() - t0) / calls
    end.record()
    torch.cuda.synchronize()
    gpu = start.elapsed_time(end) * 1e-3 / calls
    prepare()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(calls):
        issue(k)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    return {"host_ms": host * 1e3, "gpu_ms": gpu * 1e3, "wall_ms": wall * 1e3}


def measure(op: str, tokens: int, calls: int) -> dict[str, dict[str, float]]:
    forward, leaves, dys = make(op, tokens)
    for _ in range(3):  # compile, autotune nothing, warm the caches
        torch.autograd.grad(_tuple(forward()), leaves, dys)
    fwd = time_calls(lambda k: forward(), calls, 3e-3)
    graphs = []

    def build():  # each backward needs a graph of its own
        graphs[:] = [_tuple(forward()) for _ in range(calls)]

    bwd = time_calls(lambda k: torch.autograd.grad(graphs[k], leaves, dys), calls, 5e-3, build)
    return {"forward": fwd, "backward": bwd}


def outputs(op: str, tokens: int) -> list[torch.Tensor]:
    forward, leaves, dys = make(op, tokens, seed=tokens + len(op))
    ys = _tuple(forward())
    return [y.detach() for y in ys] + list(torch.autograd.grad(ys, leaves, dys))


def profile(op: str, tokens: int, calls: int, rows: int = 25) -> str:
    forward, leaves, dys = make(op, tokens)
    torch.autograd.grad(_tuple(forward()), leaves, dys)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        torch.autograd.grad(_tuple(forward()), leaves, dys)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return f"cProfile of {calls} {op} forward+backward calls at T={tokens}\n{text.getvalue()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    parser.add_argument("--kernels", type=Path, default=Path(__file__).resolve().parent.parent / "kernels")
    parser.add_argument("--json")
    parser.add_argument("--save")
    parser.add_argument("--compare")
    parser.add_argument("--profile")
    args = parser.parse_args()
    use_kernels(args.kernels)
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = {}
    for op in args.ops:
        for tokens in args.tokens:
            res = measure(op, tokens, args.calls)
            rows[f"{op} T={tokens}"] = res
            for phase, r in res.items():
                print(f"{op:7} T={tokens:6} {phase:8} host {r['host_ms']:7.3f} ms  gpu {r['gpu_ms']:7.3f} ms  "
                      f"wall {r['wall_ms']:7.3f} ms  {'HOST-BOUND' if r['host_ms'] > r['gpu_ms'] else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    cases = [(op, t) for op in args.ops for t in (*args.tokens, 1000, 5)]
    if args.save:
        torch.save({f"{g} {t}": [o.cpu() for o in outputs(g, t)] for g, t in cases}, args.save)
    if args.compare:
        ref = torch.load(args.compare)
        for g, t in cases:
            got = [o.cpu() for o in outputs(g, t)]
            same = [torch.equal(a, b) for a, b in zip(got, ref[f"{g} {t}"])]
            print(f"bit-for-bit {g} T={t}: {'identical' if all(same) else f'DIFFERENT {same}'}")
    if args.profile:
        with open(args.profile, "w") as f:
            f.write("\n".join(profile(op, args.tokens[0], args.calls) for op in args.ops))


if __name__ == "__main__":
    main()
