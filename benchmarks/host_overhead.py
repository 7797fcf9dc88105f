"""Host time against GPU time per call of the fused LoRA op, forward and backward.

    python -m benchmarks.host_overhead [--tokens 2048 16384] [--save F | --compare F] [--profile F]

Llama-2-7B shapes, bf16 base and fp32 adapters of rank 16 (PEFT's defaults): the q/k/v group
(in 4096, three outs of 4096) and a single down_proj (in 11008, out 4096). Per call:

- ``host``: seconds the Python thread spends issuing one call (forward: ``lora_linear_group``;
  backward: ``torch.autograd.grad`` through it), measured while the GPU is held busy by a sleep
  kernel, so that nothing waits on the GPU;
- ``gpu``: CUDA-event time of the same calls queued behind that sleep: the GPU's own work, with
  no gaps left by the host;
- ``wall``: synchronised wall-clock time per call of back-to-back calls: ``max(host, gpu)``
  when they overlap well.

A call is host-bound when ``host > gpu``. ``--save`` writes every output and gradient of fixed
inputs, ``--compare`` checks another implementation's against them bit for bit (``torch.equal``).
``--profile`` writes cProfile's top functions (by own time) over q/k/v calls at the first token
count. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch

from sloth_fx.kernels.lora import lora_linear_group

HIDDEN, INTERMEDIATE, RANK, SCALE = 4096, 11008, 16, 2.0
GROUPS = {"qkv": (HIDDEN, [HIDDEN] * 3), "down": (INTERMEDIATE, [HIDDEN])}


def make(group: str, tokens: int, seed: int = 0):
    """x, weights, As, Bs and output gradients of ``group`` at ``tokens``, from ``seed``."""
    in_f, outs = GROUPS[group]
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")

    def randn(*shape, dtype=torch.float32, std=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * std).to(dtype)

    x = randn(tokens, in_f, dtype=torch.bfloat16).requires_grad_()
    ws = [randn(o, in_f, dtype=torch.bfloat16, std=in_f ** -0.5) for o in outs]
    as_ = [randn(RANK, in_f, std=in_f ** -0.5).requires_grad_() for _ in outs]
    bs = [randn(o, RANK, std=0.1).requires_grad_() for o in outs]
    dys = [randn(tokens, o, dtype=torch.bfloat16) for o in outs]
    return x, ws, as_, bs, dys


def forward(x, ws, as_, bs):
    return lora_linear_group(x, ws, as_, bs, [SCALE] * len(ws))


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


def measure(group: str, tokens: int, calls: int) -> dict[str, dict[str, float]]:
    x, ws, as_, bs, dys = make(group, tokens)
    leaves = [x, *as_, *bs]
    for _ in range(3):  # compile, autotune nothing, warm the caches
        torch.autograd.grad(forward(x, ws, as_, bs), leaves, dys)
    fwd = time_calls(lambda k: forward(x, ws, as_, bs), calls, 3e-3)
    graphs = []

    def build():  # each backward needs a graph of its own
        graphs[:] = [forward(x, ws, as_, bs) for _ in range(calls)]

    bwd = time_calls(lambda k: torch.autograd.grad(graphs[k], leaves, dys), calls, 5e-3, build)
    return {"forward": fwd, "backward": bwd}


def outputs(group: str, tokens: int) -> list[torch.Tensor]:
    x, ws, as_, bs, dys = make(group, tokens, seed=tokens + len(group))
    ys = forward(x, ws, as_, bs)
    return [y.detach() for y in ys] + list(torch.autograd.grad(ys, [x, *as_, *bs], dys))


def profile(tokens: int, calls: int, rows: int = 30) -> str:
    x, ws, as_, bs, dys = make("qkv", tokens)
    leaves = [x, *as_, *bs]
    torch.autograd.grad(forward(x, ws, as_, bs), leaves, dys)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        torch.autograd.grad(forward(x, ws, as_, bs), leaves, dys)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return f"cProfile of {calls} q/k/v forward+backward calls at T={tokens}\n{text.getvalue()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json")
    parser.add_argument("--save")
    parser.add_argument("--compare")
    parser.add_argument("--profile")
    args = parser.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = {}
    for group in GROUPS:
        for tokens in args.tokens:
            res = measure(group, tokens, args.calls)
            rows[f"{group} T={tokens}"] = res
            for phase, r in res.items():
                print(f"{group:5} T={tokens:6} {phase:8} host {r['host_ms']:7.3f} ms  gpu {r['gpu_ms']:7.3f} ms  "
                      f"wall {r['wall_ms']:7.3f} ms  {'HOST-BOUND' if r['host_ms'] > r['gpu_ms'] else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    cases = [(g, t) for g in GROUPS for t in (*args.tokens, 1000, 5)]
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
            f.write(profile(args.tokens[0], args.calls))


if __name__ == "__main__":
    main()
