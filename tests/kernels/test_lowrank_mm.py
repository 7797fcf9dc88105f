"""lowrank_mm against float64: the shapes of LoRA's thin products, mixed dtypes, strides, split K."""

import pytest
import torch

import sloth_fx.kernels.lowrank_mm as mm_module
from sloth_fx.kernels.lowrank_mm import lowrank_mm

# (M, K, N): T×in·in×r, T×r·r×out, out×T·T×r, r×T·T×in, with odd sizes, r = 1, a single row
SHAPES = [(37, 50, 3), (130, 7, 40), (5, 300, 19), (1, 64, 16), (48, 1, 33), (16, 129, 64), (200, 16, 129)]
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float16),
          (torch.float16, torch.float16)]


def operands(m, k, n, da, db, seed, device="cpu", transposed=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=g).t() if transposed else torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    return a.to(device, da), b.to(device, db)


def rel_err(got, a, b, alpha, base=None):
    ref = alpha * (a.double() @ b.double()) + (0 if base is None else base.double())
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("da,db", DTYPES)
def test_fresh_fp32_out_against_float64(m, k, n, da, db):
    a, b = operands(m, k, n, da, db, seed=m * k + n, transposed=m % 2 == 1)
    got = lowrank_mm(a, b, alpha=0.75)
    assert got.dtype == torch.float32 and got.shape == (m, n) and torch.isfinite(got).all()
    assert rel_err(got, a, b, 0.75) < 2e-6  # fp32 accumulation whatever the operands' dtypes


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_accumulate_in_place_rounds_once(m, k, n, out_dtype):
    a, b = operands(m, k, n, torch.float32, torch.float32, seed=k)
    out = torch.randn(m, n, generator=torch.Generator().manual_seed(n)).to(out_dtype)
    base = out.clone()
    got = lowrank_mm(a, b, alpha=-2.0, out=out, accumulate=True)
    assert got.data_ptr() == out.data_ptr() and got.dtype == out_dtype
    ref = (base.double() - 2.0 * (a.double() @ b.double())).to(out_dtype)
    # one rounding of the exact sum: at most one ulp of the output dtype from the rounded reference
    ulp = torch.finfo(out_dtype).eps * ref.double().abs().clamp_min(torch.finfo(out_dtype).tiny)
    assert ((got.double() - ref.double()).abs() <= ulp + 4e-6 * ref.double().abs().max()).all()


def test_poisoned_out_is_overwritten_and_strided_out_is_written_in_place():
    a, b = operands(33, 70, 24, torch.float16, torch.float32, seed=3)
    big = torch.full((33, 40), float("nan"))
    view = big[:, 8:32]  # columns of a wider buffer, as LoRA writes each sibling's slice of g
    lowrank_mm(a, b, out=view)
    assert torch.isnan(big[:, :8]).all() and torch.isnan(big[:, 32:]).all()
    assert torch.isfinite(view).all() and rel_err(view, a, b, 1.0) < 2e-6


@pytest.mark.parametrize("split_k", [1, 2, 3, 7])
def test_split_k_partials_sum_to_the_product(split_k):
    a, b = operands(20, 333, 17, torch.float16, torch.float32, seed=split_k, transposed=True)
    got = lowrank_mm(a, b, alpha=0.5, split_k=split_k)
    assert rel_err(got, a, b, 0.5) < 2e-6


def test_float64_takes_the_reference_path():
    a, b = operands(9, 13, 5, torch.float64, torch.float32, seed=4)
    got = lowrank_mm(a, b)
    assert got.dtype == torch.float64 and rel_err(got, a, b, 1.0) < 1e-12


def test_bad_inputs_are_refused():
    a, b = operands(4, 6, 3, torch.float32, torch.float32, seed=5)
    with pytest.raises(ValueError, match="a \\[M, K\\] and b \\[K, N\\]"):
        lowrank_mm(a, b.t())
    with pytest.raises(TypeError, match="floating-point"):
        lowrank_mm(a.long(), b)
    with pytest.raises(ValueError, match="needs an out"):
        lowrank_mm(a, b, accumulate=True)
    with pytest.raises(ValueError, match="out has shape"):
        lowrank_mm(a, b, out=torch.empty(4, 4))
    with pytest.raises(ValueError, match="only for a fresh fp32 out"):
        lowrank_mm(torch.randn(4, 200), torch.randn(200, 3), out=torch.empty(4, 3).half(), split_k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", SHAPES + [(16384, 4096, 48), (16384, 16, 11008), (4096, 16384, 16), (48, 16384, 4096)])
@pytest.mark.parametrize("da,db", DTYPES + [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                            (torch.bfloat16, torch.bfloat16)])
def test_on_gpu_against_float64(m, k, n, da, db):
    """The kernel itself: every product on Triton, however small."""
    a, b = operands(m, k, n, da, db, seed=m + k + n, device="cuda", transposed=n < 64)
    got = lowrank_mm(a, b, alpha=0.5)
    assert torch.isfinite(got).all() and rel_err(got, a, b, 0.5) < 3e-5  # fp32 accuracy: pieces exact, K up to 16384 summed in fp32
    out = torch.randn(m, n, device="cuda").to(torch.bfloat16)
    base = out.clone()
    lowrank_mm(a, b, alpha=0.5, out=out, accumulate=True)
    assert torch.isfinite(out).all() and rel_err(out, a, b, 0.5, base) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(2048, 4096, 48), (2048, 16, 4096), (4096, 2048, 16)])
def test_on_gpu_host_bound_products_run_as_pytorch_at_fp32_accuracy(m, k, n, monkeypatch):
    """With host_bound a CUDA product skips the Triton launch, at the same accuracy."""
    monkeypatch.setattr(mm_module, "_lowrank_mm_kernel", None)  # a launch would fail
    a, b = operands(m, k, n, torch.bfloat16, torch.float32, seed=m + k + n, device="cuda", transposed=n < 64)
    got = lowrank_mm(a, b, alpha=0.5, host_bound=True)
    assert torch.isfinite(got).all() and rel_err(got, a, b, 0.5) < 3e-5
    out = torch.randn(m, n, device="cuda").to(torch.bfloat16)
    base = out.clone()
    lowrank_mm(a, b, alpha=0.5, out=out, accumulate=True, host_bound=True)
    assert rel_err(out, a, b, 0.5, base) < TOL[torch.bfloat16]


def test_partials_side_by_side_sum_to_each_product():
    """Two products' K-slice partials in one buffer (columns side by side), summed in one pass:
    bit for bit each product with its own split and sum."""
    (a1, b1), (a2, b2) = operands(20, 333, 5, torch.float16, torch.float32, 6), operands(20, 333, 7, torch.float32, torch.float32, 7)
    partials = torch.full((3, 20, 12), float("nan"))
    lowrank_mm(a1, b1, alpha=0.5, split_k=3, partials=partials[:, :, :5])
    lowrank_mm(a2, b2, alpha=2.0, split_k=3, partials=partials[:, :, 5:])
    both = partials.sum(0)
    assert torch.equal(both[:, :5], lowrank_mm(a1, b1, alpha=0.5, split_k=3))
    assert torch.equal(both[:, 5:], lowrank_mm(a2, b2, alpha=2.0, split_k=3))
    with pytest.raises(ValueError, match="partials has 2 slices"):
        lowrank_mm(a1, b1, split_k=3, partials=partials[:2, :, :5])
    with pytest.raises(ValueError, match="partials must be"):
        lowrank_mm(a1, b1, out=torch.empty(20, 5), partials=partials[:, :, :5])
