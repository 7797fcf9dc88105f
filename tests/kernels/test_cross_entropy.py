"""Fused lm_head + cross-entropy: Triton path vs a float64 oracle, vs the (HF-exact) reference, vs HF.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes are small;
the block size cap is lowered in some cases so that the online log-sum-exp loop runs over several
vocab blocks, and small memory budgets force several chunks.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import sloth_fx.kernels.cross_entropy as ce
import sloth_fx.kernels.cross_entropy_chunks as chunks
from sloth_fx.kernels.cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy, linear_cross_entropy_supports
from sloth_fx.kernels.cross_entropy_chunks import chunk_rows
from sloth_fx.kernels.cross_entropy_reference import LogitScale, linear_cross_entropy_reference

_seed = itertools.count(1234)


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(next(_seed))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# loss: relative error of the scalar; grads: relative error by norm
TOL = {
    # vs the float64 oracle
    "oracle": {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 3e-2)},
    # vs the reference in the same dtype (HF's own roundings of logits and gradients)
    "reference": {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1e-2)},
}


@pytest.fixture(autouse=True)
def poison_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the module allocates starts as NaN, so an element the code fails to write shows."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(chunks, "_empty", poisoned)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor


def make_inputs(
    n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, *, bias: bool, ignore: str = "scatter",
    logit_std: float = 2.0,
) -> Inputs:
    g = fresh_generator()
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * (logit_std / h**0.5)
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore == "scatter":
        labels[torch.rand(n, generator=g) < 0.3] = -100
        if n > 1:
            labels[0] = -100  # at least one ignored, at least one kept
            labels[-1] = int(torch.randint(0, v, (1,), generator=g))
    elif ignore == "all":
        labels[:] = -100
    elif ignore == "edges":
        labels[0] = -100
        labels[-1] = -100
    else:
        assert ignore == "none"
    to = dict(dtype=dtype, device=device)
    return Inputs(hidden.to(**to), weight.to(**to), None if b is None else b.to(**to), labels.to(device))


def run(
    fn, inp: Inputs, *, grads: tuple[bool, bool, bool] = (True, True, True), grad_scale: float = 1.0,
    dtype: torch.dtype | None = None, **kwargs,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Loss and (hidden, weight, bias) gradients of fn on fresh leaves (optionally cast to dtype)."""
    leaves = []
    for t, req in zip((inp.hidden, inp.weight, inp.bias), grads):
        if t is None:
            leaves.append(None)
            continue
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        leaves.append(t.requires_grad_(req))
    loss = fn(leaves[0], leaves[1], inp.labels, bias=leaves[2], **kwargs)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    if wanted:
        (loss * grad_scale).sum().backward()
    return loss.detach(), [None if t is None else t.grad for t in leaves]


def oracle(hidden, weight, labels, *, bias=None, ignore_index=-100, num_items_in_batch=None, logit_softcap=None):
    """The same maths in float64 (inputs are the low-precision values, exactly upcast)."""
    logits = F.linear(hidden, weight, bias)
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def assert_close(out, ref, loss_tol: float, grad_tol: float, what: str) -> None:
    (loss, grads), (ref_loss, ref_grads) = out, ref
    assert torch.isfinite(loss).all(), f"{what}: loss {loss}"
    assert loss.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= loss_tol, f"{what}: loss {loss.item()} vs {ref_loss.item()}"
    for name, g, rg in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads):
        assert (g is None) == (rg is None), f"{what}: {name} presence"
        if g is None:
            continue
        assert g.shape == rg.shape
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        err = rel_err(g, rg)
        assert err <= grad_tol, f"{what}: {name} rel err {err:.3g} > {grad_tol}"


def num_items(kind: str, labels: torch.Tensor):
    n_valid = int((labels != -100).sum())
    if kind == "none":
        return None
    if kind == "int":
        return n_valid + 3  # as in gradient accumulation: the count over all micro-batches
    if kind == "tensor":
        return torch.tensor(n_valid + 3, device=labels.device)
    if kind == "tensor1":
        return torch.tensor([n_valid + 3], device=labels.device)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------
# forward + backward against the float64 oracle and the same-dtype reference
# ----------------------------------------------------------------------------------------------

# (N, H, V, bias, softcap, num_items, rows per chunk (None: default budget), max vocab block (None: default), ignore)
CASES = [
    (37, 24, 1000, False, None, "none", None, None, "scatter"),
    (1, 16, 257, True, None, "none", None, None, "none"),  # a single row
    (19, 40, 257, True, 4.0, "int", 5, 64, "scatter"),  # softcap, 5 blocks, 4 chunks (last of 4)
    (13, 16, 33, False, None, "tensor", 1, 16, "scatter"),  # one row per chunk, 3 blocks (last of 1)
    (20, 32, 5000, False, None, "none", 7, None, "scatter"),  # two blocks of the default size
    (20, 32, 5000, True, 30.0, "int", None, None, "edges"),  # Gemma-2's cap
    (23, 24, 1000, True, None, "none", 4, 128, "edges"),
    (17, 20, 100, False, 2.0, "tensor", 2, 32, "scatter"),  # cap well inside the logit range
    (9, 16, 70, True, None, "tensor1", 4, 16, "scatter"),  # [1]-shaped num_items: loss shaped [1], as HF
]


def case_id(c) -> str:
    n, h, v, bias, cap, nib, rows, block, ignore = c
    return f"N{n}-H{h}-V{v}-{'bias' if bias else 'nobias'}-cap{cap}-{nib}-rows{rows}-blk{block}-{ignore}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_oracle_and_reference(case, dtype, device, monkeypatch):
    n, h, v, bias, cap, nib, rows, block, ignore = case
    if block is not None:
        monkeypatch.setattr(chunks, "_MAX_BLOCK_V", block)
    inp = make_inputs(n, h, v, dtype, device, bias=bias, ignore=ignore, logit_std=8.0 if cap else 2.0)
    kw = dict(num_items_in_batch=num_items(nib, inp.labels), logit_softcap=cap)
    budget = None if rows is None else rows * v * inp.hidden.element_size()
    if rows is not None:
        assert chunk_rows(n, v, h, dtype, budget) == min(rows, n)

    out = run(linear_cross_entropy, inp, memory_budget_bytes=budget, **kw)
    ref64 = run(oracle, inp, dtype=torch.float64, **kw)
    ref = run(linear_cross_entropy_reference, inp, **kw)
    assert_close(out, ref64, *TOL["oracle"][dtype], what="vs float64")
    assert_close(out, ref, *TOL["reference"][dtype], what="vs reference")
    for g, t in zip(out[1], (inp.hidden, inp.weight, inp.bias)):
        assert g is None or g.dtype == t.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grad_output_not_one(dtype, device, monkeypatch):
    monkeypatch.setattr(chunks, "_MAX_BLOCK_V", 64)
    inp = make_inputs(19, 24, 300, dtype, device, bias=True)
    out = run(linear_cross_entropy, inp, grad_scale=3.7, memory_budget_bytes=4 * 300 * inp.hidden.element_size())
    ref64 = run(oracle, inp, dtype=torch.float64, grad_scale=3.7)
    assert_close(out, ref64, *TOL["oracle"][dtype], what="grad_output 3.7")


@pytest.mark.parametrize("nib", ["none", "int", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_all_labels_ignored(nib, dtype, device):
    """HF: mean over zero labels is nan (0/0); sum / num_items is 0. Gradients are exactly 0 either way."""
    inp = make_inputs(11, 16, 90, dtype, device, bias=True, ignore="all")
    n_items = {"none": None, "int": 5, "tensor": torch.tensor(5, device=device)}[nib]
    loss, grads = run(linear_cross_entropy, inp, num_items_in_batch=n_items, memory_budget_bytes=3 * 90 * 4)
    ref_loss, ref_grads = run(linear_cross_entropy_reference, inp, num_items_in_batch=n_items)
    if nib == "none":
        assert torch.isnan(loss) and torch.isnan(ref_loss)
    else:
        assert loss.item() == 0.0 and ref_loss.item() == 0.0
    for g, rg in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert torch.count_nonzero(g) == 0
        assert torch.count_nonzero(rg) == 0


def test_frozen_weight_computes_no_weight_grad(device, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("d_weight accumulated for a frozen weight")

    monkeypatch.setattr(chunks, "_accumulate_d_weight", forbidden)
    inp = make_inputs(21, 24, 200, torch.float32, device, bias=False)
    out = run(linear_cross_entropy, inp, grads=(True, False, False), memory_budget_bytes=4 * 200 * 4)
    assert out[1][1] is None
    ref64 = run(oracle, inp, grads=(True, False, False), dtype=torch.float64)
    assert_close(out, ref64, *TOL["oracle"][torch.float32], what="frozen weight")


@pytest.mark.parametrize("grads", [(False, True, True), (False, False, True), (True, True, False)])
def test_partial_requires_grad(grads, device):
    inp = make_inputs(15, 24, 150, torch.float32, device, bias=True)
    out = run(linear_cross_entropy, inp, grads=grads, memory_budget_bytes=4 * 150 * 4)
    ref64 = run(oracle, inp, grads=grads, dtype=torch.float64)
    for g, want in zip(out[1], grads):
        assert (g is not None) == want
    assert_close(out, ref64, *TOL["oracle"][torch.float32], what=f"grads {grads}")


def test_no_grad_runs_loss_only(device, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("autograd Function used under no_grad")

    monkeypatch.setattr(LinearCrossEntropyFunction, "apply", forbidden)
    inp = make_inputs(21, 24, 200, torch.float16, device, bias=True)
    w = inp.weight.clone().requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(inp.hidden, w, inp.labels, bias=inp.bias, memory_budget_bytes=3 * 200 * 2)
    ref = oracle(inp.hidden.double(), inp.weight.double(), inp.labels, bias=inp.bias.double())
    assert torch.isfinite(loss) and rel_err(loss, ref) <= TOL["oracle"][torch.float16][0]


def test_non_contiguous_inputs(device):
    g = fresh_generator()
    n, h, v = 17, 24, 130
    hidden = torch.randn(n, 2 * h, generator=g)[:, ::2].to(device)  # column stride 2
    weight = (torch.randn(h, v, generator=g) / h**0.5).to(device).t()  # [V, H] transposed view
    labels = torch.randint(0, v, (2 * n,), generator=g).to(device)[::2]  # stride 2
    labels[3] = -100
    inp = Inputs(hidden, weight, None, labels)
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    out = run(linear_cross_entropy, inp, memory_budget_bytes=5 * v * 4)
    ref64 = run(oracle, inp, dtype=torch.float64)
    assert_close(out, ref64, *TOL["oracle"][torch.float32], what="non-contiguous")


def test_reference_path_when_triton_unavailable(device, monkeypatch):
    """Where use_triton is false the dispatch is the reference itself, bit for bit."""
    monkeypatch.setattr(ce, "use_triton", lambda *tensors: False)
    inp = make_inputs(12, 16, 50, torch.float32, device, bias=True)
    loss, grads = run(linear_cross_entropy, inp, logit_softcap=3.0)
    ref_loss, ref_grads = run(linear_cross_entropy_reference, inp, logit_softcap=3.0)
    assert torch.equal(loss, ref_loss)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# chunking: the rule, and that nothing [N, V] is allocated
# ----------------------------------------------------------------------------------------------


def test_chunk_rows_rule():
    # default budget: the bytes of hidden (N * H * itemsize)
    assert chunk_rows(100, 1000, 64, torch.float16, None) == 100 * 64 // 1000
    assert chunk_rows(16384, 32000, 4096, torch.bfloat16, None) == 16384 * 4096 // 32000 < 16384
    assert chunk_rows(16384, 128256, 4096, torch.bfloat16, None) == 16384 * 4096 // 128256
    # override
    assert chunk_rows(100, 1000, 64, torch.float32, 10 * 1000 * 4) == 10
    assert chunk_rows(100, 1000, 64, torch.float32, 10 * 1000 * 4 - 1) == 9
    assert chunk_rows(100, 1000, 64, torch.bfloat16, 10 * 1000 * 4) == 20
    # at least one row, at most N
    assert chunk_rows(100, 1000, 64, torch.float32, 1) == 1
    assert chunk_rows(3, 1000, 8, torch.float32, None) == 1  # hidden smaller than one logits row
    assert chunk_rows(100, 1000, 64, torch.float32, 10**12) == 100
    assert chunk_rows(1, 10, 10**6, torch.float32, None) == 1
    assert chunk_rows(0, 1000, 64, torch.float32, None) == 1


@pytest.mark.parametrize(
    "args, exc",
    [
        ((100, 1000, 64, torch.float32, 0), ValueError),
        ((100, 1000, 64, torch.float32, -8), ValueError),
        ((100, 0, 64, torch.float32, None), ValueError),
        ((-1, 1000, 64, torch.float32, None), ValueError),
        ((100, 1000, 64, torch.float32, 1e6), TypeError),
        ((100.0, 1000, 64, torch.float32, None), TypeError),
    ],
)
def test_chunk_rows_bad_args(args, exc):
    with pytest.raises(exc):
        chunk_rows(*args)


def test_chunk_buffer_is_bounded_and_results_do_not_depend_on_it(device, monkeypatch):
    n, h, v = 40, 16, 300
    inp = make_inputs(n, h, v, torch.float32, device, bias=True)
    allocations: list[tuple[int, ...]] = []
    poisoned = chunks._empty

    def spy(shape, dtype, dev):
        allocations.append(tuple(shape))
        return poisoned(shape, dtype, dev)

    monkeypatch.setattr(chunks, "_empty", spy)
    results = {}
    for rows in (1, 3, 7, 40):
        budget = rows * v * 4
        c = chunk_rows(n, v, h, torch.float32, budget)
        assert c == rows
        allocations.clear()
        results[rows] = run(linear_cross_entropy, inp, memory_budget_bytes=budget)
        # the vocab-wide buffers: one [c, V] chunk buffer, the [V, H] d_weight accumulator, [V] d_bias
        wide = [s for s in allocations if v in s]
        assert sorted(wide) == sorted([(c, v), (v, h), (v,)]), allocations
    assert chunk_rows(n, v, h, torch.float32, 10 * v * 4) < n  # a budget below N*V*4 chunks
    base_loss, base_grads = results[40]
    for rows, (loss, grads) in results.items():
        assert rel_err(loss, base_loss) <= 1e-6, rows
        for g, bg in zip(grads, base_grads):
            assert rel_err(g, bg) <= 1e-6, rows


# ----------------------------------------------------------------------------------------------
# against transformers' own loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nib", ["none", "tensor", "int"])
def test_reference_is_hf_for_causal_lm_loss(nib):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = fresh_generator()
    b, s, h, v = 2, 9, 16, 97
    hidden = torch.randn(b, s, h, generator=g, requires_grad=True)
    lm_head = torch.nn.Linear(h, v, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.randn(v, h, generator=g) / h**0.5)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :3] = -100
    labels[1, 5] = -100
    n_items = {"none": None, "tensor": torch.tensor(20), "int": 20}[nib]

    hf = ForCausalLMLoss(lm_head(hidden), labels, vocab_size=v, num_items_in_batch=n_items)
    hf_grads = torch.autograd.grad(hf, (hidden, lm_head.weight))

    shift = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    ours = linear_cross_entropy_reference(hidden.reshape(-1, h), lm_head.weight, shift, num_items_in_batch=n_items)
    our_grads = torch.autograd.grad(ours, (hidden, lm_head.weight))
    assert torch.equal(ours, hf)
    for a, b_ in zip(our_grads, hf_grads):
        assert torch.allclose(a, b_, rtol=1e-6, atol=1e-7)

    fused = linear_cross_entropy(hidden.reshape(-1, h), lm_head.weight, shift, num_items_in_batch=n_items,
                                 memory_budget_bytes=5 * v * 4)
    fused_grads = torch.autograd.grad(fused, (hidden, lm_head.weight))
    assert torch.isfinite(fused) and rel_err(fused, hf) <= 1e-5
    for a, b_ in zip(fused_grads, hf_grads):
        assert rel_err(a, b_) <= 1e-5


def test_softcap_matches_gemma2_style_capping():
    """Gemma-2's head: logits / cap, tanh, * cap, then HF's loss (identical in fp32 models)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = fresh_generator()
    n, h, v, cap = 14, 16, 60, 3.0
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[4] = -100
    logits = F.linear(hidden, weight)
    logits = torch.tanh(logits / cap) * cap
    hf = ForCausalLMLoss(logits, labels, vocab_size=v, shift_labels=labels)
    assert torch.equal(linear_cross_entropy_reference(hidden, weight, labels, logit_softcap=cap), hf)
    fused = linear_cross_entropy(hidden, weight, labels, logit_softcap=cap)
    assert rel_err(fused, hf) <= 1e-5


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def _bad(**changes):
    def make(device):
        inp = make_inputs(6, 8, 20, torch.float32, device, bias=False, ignore="none")
        kw = dict(hidden=inp.hidden, weight=inp.weight, labels=inp.labels)
        for k, f in changes.items():
            kw[k] = f(kw, device)
        return kw

    return make


BAD = [
    ("fp64 hidden", _bad(hidden=lambda kw, d: kw["hidden"].double(), weight=lambda kw, d: kw["weight"].double()), TypeError, "not supported"),
    ("int hidden", _bad(hidden=lambda kw, d: kw["hidden"].long()), TypeError, "not supported"),
    ("mixed dtypes", _bad(weight=lambda kw, d: kw["weight"].half()), TypeError, "weight dtype"),
    ("int32 labels", _bad(labels=lambda kw, d: kw["labels"].int()), TypeError, "int64"),
    ("3-D hidden", _bad(hidden=lambda kw, d: kw["hidden"].reshape(2, 3, 8)), ValueError, r"\[N, H\]"),
    ("H mismatch", _bad(weight=lambda kw, d: kw["weight"][:, :5]), ValueError, r"\[V, H\]"),
    ("N mismatch", _bad(labels=lambda kw, d: kw["labels"][:5]), ValueError, r"labels must be \[N\]"),
    ("bias shape", _bad(bias=lambda kw, d: torch.zeros(19, device=d)), ValueError, "bias must be"),
    ("bias dtype", _bad(bias=lambda kw, d: torch.zeros(20, device=d, dtype=torch.float16)), TypeError, "bias dtype"),
    ("softcap 0", _bad(logit_softcap=lambda kw, d: 0.0), ValueError, "logit_softcap"),
    ("softcap < 0", _bad(logit_softcap=lambda kw, d: -2.0), ValueError, "logit_softcap"),
    ("softcap inf", _bad(logit_softcap=lambda kw, d: float("inf")), ValueError, "logit_softcap"),
    ("budget 0", _bad(memory_budget_bytes=lambda kw, d: 0), ValueError, "memory_budget_bytes"),
    ("num_items [2]", _bad(num_items_in_batch=lambda kw, d: torch.tensor([3, 4], device=d)), ValueError, "num_items_in_batch"),
    ("num_items str", _bad(num_items_in_batch=lambda kw, d: "7"), TypeError, "num_items_in_batch"),
    ("ignore_index float", _bad(ignore_index=lambda kw, d: -100.0), TypeError, "ignore_index"),
]


@pytest.mark.parametrize("make, exc, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(make, exc, match, device):
    kw = make(device)
    hidden, weight, labels = kw.pop("hidden"), kw.pop("weight"), kw.pop("labels")
    with pytest.raises(exc, match=match):
        linear_cross_entropy(hidden, weight, labels, **kw)


# the memory budget is no question of the inputs (the labels' range, a question of values, is
# checked when the op runs: test_cross_entropy_labels.py)
INPUT_QUESTIONS = [b for b in BAD if not b[0].startswith("budget")]


@pytest.mark.parametrize("make, exc, match", [b[1:] for b in INPUT_QUESTIONS], ids=[b[0] for b in INPUT_QUESTIONS])
def test_supports_answers_what_the_op_raises(make, exc, match, device):
    kw = make(device)
    reason = linear_cross_entropy_supports(kw.pop("hidden"), kw.pop("weight"), kw.pop("labels"), **kw)
    assert reason is not None and re.search(match, reason), reason


def test_supports_takes_fake_tensors():
    with FakeTensorMode():
        hidden, weight = torch.empty(10, 64, dtype=torch.bfloat16), torch.empty(100, 64, dtype=torch.bfloat16)
        labels = torch.empty(10, dtype=torch.long)
        assert linear_cross_entropy_supports(hidden, weight, labels, num_items_in_batch=torch.empty(())) is None
        assert "weight dtype" in linear_cross_entropy_supports(hidden, weight.float(), labels)
        assert "not finite" in linear_cross_entropy_supports(hidden, weight, labels, logit_scale=LogitScale("div", 0.0))


def test_ignored_label_may_be_any_value(device):
    """An ignore_index inside [0, V) is ignored, not range-checked or counted."""
    inp = make_inputs(10, 8, 20, torch.float32, device, bias=False, ignore="none")
    inp.labels[2] = 7
    out = run(linear_cross_entropy, inp, ignore_index=7)
    ref64 = run(oracle, inp, dtype=torch.float64, ignore_index=7)
    assert_close(out, ref64, *TOL["oracle"][torch.float32], what="ignore_index=7")


# ----------------------------------------------------------------------------------------------
# GPU (run by the lead on the lent GPU)
# ----------------------------------------------------------------------------------------------


def _gpu_inputs(n, h, v, dtype, bias, ignore="scatter"):
    return make_inputs(n, h, v, dtype, torch.device("cuda"), bias=bias, ignore=ignore)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cap, nib", [(None, "none"), (30.0, "tensor")], ids=["plain", "softcap-num_items"])
def test_gpu_training_shape(dtype, cap, nib):
    inp = _gpu_inputs(4096, 1024, 32000, dtype, bias=False)
    kw = dict(num_items_in_batch=num_items(nib, inp.labels), logit_softcap=cap)
    out = run(linear_cross_entropy, inp, **kw)  # default budget: 131 rows per chunk, 32 chunks
    ref = run(linear_cross_entropy_reference, inp, **kw)
    ref32 = run(oracle, inp, dtype=torch.float32, **kw)
    assert_close(out, ref, *TOL["reference"][dtype], what="vs reference")
    assert_close(out, ref32, *TOL["oracle"][dtype], what="vs fp32")
    del ref, ref32
    ref64 = run(oracle, inp, dtype=torch.float64, **kw)
    assert_close(out, ref64, *TOL["oracle"][dtype], what="vs float64")


@pytest.mark.gpu
def test_gpu_large_vocab_with_bias():
    inp = _gpu_inputs(300, 256, 128256, torch.bfloat16, bias=True)
    out = run(linear_cross_entropy, inp)
    ref64 = run(oracle, inp, dtype=torch.float64)
    ref = run(linear_cross_entropy_reference, inp)
    assert_close(out, ref64, *TOL["oracle"][torch.bfloat16], what="vs float64")
    assert_close(out, ref, *TOL["reference"][torch.bfloat16], what="vs reference")


@pytest.mark.gpu
def test_gpu_memory_never_holds_full_logits():
    n, h, v = 4096, 1024, 32000
    inp = _gpu_inputs(n, h, v, torch.bfloat16, bias=False)
    # warm-up: cuBLAS workspaces and the compiled kernel are allocated once, outside the measurement
    linear_cross_entropy(inp.hidden.clone().requires_grad_(), inp.weight, inp.labels).backward()
    hidden = inp.hidden.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(hidden, inp.weight, inp.labels)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    full_logits = n * v * 2
    # the chunk buffer (~ the bytes of hidden, 8 MiB) + d_hidden (8 MiB) + small things; HF would hold
    # the bf16 logits and an fp32 copy (750 MiB)
    assert peak < full_logits / 4, (peak, full_logits)
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_token_count_changing_between_calls(dtype, device, monkeypatch):
    """Row tiles are cached per vocabulary: N = 5, 17, 5 tokens (several vocab blocks, several
    chunks) each match float64 and the reference, and the second N = 5 call repeats the first bit
    for bit, gradient scaling by a grad_output != 1 included."""
    monkeypatch.setattr(chunks, "_MAX_BLOCK_V", 64)
    inputs = {n: make_inputs(n, 24, 300, dtype, device, bias=True) for n in (5, 17)}
    runs = []
    for n in (5, 17, 5):
        inp = inputs[n]
        budget = 4 * 300 * inp.hidden.element_size()  # 4 rows a chunk
        out = run(linear_cross_entropy, inp, memory_budget_bytes=budget, grad_scale=0.75)
        assert_close(out, run(oracle, inp, dtype=torch.float64, grad_scale=0.75), *TOL["oracle"][dtype],
                     what=f"N={n} vs float64")
        assert_close(out, run(linear_cross_entropy_reference, inp, grad_scale=0.75), *TOL["reference"][dtype],
                     what=f"N={n} vs reference")
        runs.append(out)
    (loss_a, grads_a), (loss_b, grads_b) = runs[0], runs[2]
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.equal(a, b)
