"""The bf16 pieces of LoRA's small products against float64: the split is exact, the products are
fp32-accurate, an accumulated 16-bit out is rounded once. On CPU the GEMMs run on fp32 copies of
the pieces (the same values cuBLAS sums); on the GPU through cuBLAS itself."""

import pytest
import torch

import sloth_fx.kernels.lowrank_mm as mm_module
from sloth_fx.kernels.lowrank_mm import lowrank_mm
from sloth_fx.kernels.lowrank_pieces import bf16_pieces, pieces_mm, takes_pieces

BF16, FP32 = torch.bfloat16, torch.float32
# (M, K, N) as LoRA's products: T×in·in×r, T×r·r×out, out×T·T×r, r×T·T×in; odd sizes, r = 1
SHAPES = [(37, 50, 3), (130, 7, 40), (5, 300, 19), (1, 64, 16), (48, 1, 33), (200, 16, 129)]
CASES = [(BF16, FP32), (FP32, BF16), (BF16, BF16), (FP32, FP32)]


def operands(m, k, n, da, db, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.logspace(-3, 3, k)  # magnitudes over six decades
    b = torch.randn(k, n, generator=g)
    if seed % 2:  # transposed operands, as LoRA passes B.t() and gᵀ
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    return a.to(device, da), b.to(device, db)


def rel_err(got, ref):
    assert torch.isfinite(got).all()
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("transposed", [False, True])
def test_pieces_sum_to_the_fp32_tensor_exactly(transposed):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(33, 70, generator=g) * torch.logspace(-30, 30, 70)
    t[0, :3] = torch.tensor([0.0, -0.0, 1.0 + 2**-23])
    t = t.t() if transposed else t
    hi, mid, lo = bf16_pieces(t)
    assert {hi.dtype, mid.dtype, lo.dtype} == {BF16}
    assert torch.equal(hi.double() + mid.double() + lo.double(), t.double())
    assert (mid.double().abs() <= hi.double().abs() * 2**-7).all()
    assert (lo.double().abs() <= mid.double().abs() * 2**-7).all()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("da,db", CASES[:3])
def test_fresh_fp32_product_against_float64(m, k, n, da, db):
    a, b = operands(m, k, n, da, db, seed=m + k + n)
    got = pieces_mm(a, b, alpha=0.75)
    assert got.dtype == FP32
    assert rel_err(got, 0.75 * (a.double() @ b.double())) < 2e-6


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("da,db", CASES)
def test_accumulated_into_bf16_rounded_once(m, k, n, da, db):
    """``out + alpha·a·b`` in fp32, then one rounding: within half a bf16 ulp of the float64 sum
    (plus the fp32 sum's own error), where two roundings would reach a whole ulp."""
    a, b = operands(m, k, n, da, db, seed=m + k + n + 1)
    base = (torch.randn(m, n, generator=torch.Generator().manual_seed(m)) * 4).to(BF16)
    out = base.clone()
    assert pieces_mm(a, b, alpha=-0.5, out=out, accumulate=True) is out
    ref = base.double() - 0.5 * (a.double() @ b.double())
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    assert ((out.double() - ref).abs() <= 0.5 * ulp + 1e-5 * ref.abs().max()).all()


@pytest.mark.parametrize("da,db", CASES[:3])
def test_written_and_accumulated_into_fp32_out(da, db):
    a, b = operands(40, 24, 9, da, db, seed=5)
    out = torch.full((40, 9), float("nan"))
    pieces_mm(a, b, alpha=2.0, out=out)
    ref = 2.0 * (a.double() @ b.double())
    assert rel_err(out, ref) < 2e-6
    pieces_mm(a, b, out=out, accumulate=True)
    assert rel_err(out, ref * 1.5) < 2e-6


def test_which_products_take_the_pieces():
    """CUDA only, bf16 with fp32; two fp32 operands only into an accumulated bf16 out."""
    meta = {d: torch.empty(4, 4, device="meta", dtype=d) for d in (BF16, FP32, torch.float16)}
    assert not takes_pieces(torch.empty(4, 4, dtype=BF16), torch.empty(4, 4), None, False)  # CPU
    if not torch.cuda.is_available():
        pytest.skip("the CUDA half of the rule needs a CUDA device")
    cuda = {d: t.to("cuda") for d, t in meta.items()}
    assert takes_pieces(cuda[BF16], cuda[FP32], None, False)
    assert takes_pieces(cuda[FP32], cuda[FP32], cuda[BF16], True)
    assert not takes_pieces(cuda[FP32], cuda[FP32], None, False)
    assert not takes_pieces(cuda[torch.float16], cuda[FP32], None, False)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", SHAPES + [(2048, 4096, 48), (2048, 16, 11008), (11008, 2048, 16), (48, 2048, 4096)])
@pytest.mark.parametrize("da,db", CASES)
def test_gpu_small_products_through_cublas_against_float64(m, k, n, da, db, monkeypatch):
    """``lowrank_mm`` below HOST_BOUND_VOLUME on CUDA: no Triton launch, fp32 accuracy, one rounding."""
    monkeypatch.setattr(mm_module, "_lowrank_mm_kernel", None)  # a launch would fail
    a, b = operands(m, k, n, da, db, seed=m + k + n, device="cuda")
    ref = 0.5 * (a.double() @ b.double())
    if da != FP32 or db != FP32:
        assert rel_err(lowrank_mm(a, b, alpha=0.5), ref) < 3e-6
    base = torch.randn(m, n, device="cuda").to(BF16)
    out = base.clone()
    lowrank_mm(a, b, alpha=0.5, out=out, accumulate=True)
    assert rel_err(out, base.double() + ref) < 2**-8
