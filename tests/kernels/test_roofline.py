"""The roofline: the time of a product or a pass on a device, and the device's rates."""

import pytest
import torch

from sloth_fx.kernels.roofline import DEFAULT_RATES, DeviceRates, matmul_cost, measure_device_rates, stream_cost


def test_single_product_cost():
    c = matmul_cost(8, 16, 32, elem_bytes=2)
    assert c.flops == 2 * 8 * 16 * 32 and c.bytes == (8 * 16 + 16 * 32 + 8 * 32) * 2
    assert c.seconds == max(c.flops / DEFAULT_RATES.flops, c.bytes / DEFAULT_RATES.bandwidth)
    # accumulating into C reads it too
    assert matmul_cost(8, 16, 32, 2, accumulate=True).bytes == c.bytes + 8 * 32 * 2


def test_roofline_picks_the_binding_resource():
    rates = DeviceRates(flops=1e12, bandwidth=1e9, flops_fp32=1e11)
    big = matmul_cost(1024, 1024, 1024, 2, rates)  # ~341 FLOP/B, under this device's balance of 1000
    assert big.seconds == pytest.approx(big.bytes / 1e9) and big.seconds > big.flops / 1e12
    compute_bound = matmul_cost(4096, 4096, 4096, 2, DeviceRates(flops=1e9, bandwidth=1e15))
    assert compute_bound.seconds == pytest.approx(2 * 4096**3 / 1e9)
    memory_bound = matmul_cost(1, 4096, 4096, 2, DeviceRates(flops=1e18, bandwidth=1e9))
    assert memory_bound.seconds == pytest.approx((4096 + 4096 * 4096 + 4096) * 2 / 1e9)
    # fp32 uses the fp32 rate
    assert matmul_cost(4096, 4096, 4096, 4, DeviceRates(flops=1e9, bandwidth=1e15, flops_fp32=1e8)).seconds == \
        pytest.approx(2 * 4096**3 / 1e8)
    assert stream_cost(3e9, rates).seconds == pytest.approx(3.0)


def test_bad_sizes_and_rates_raise():
    with pytest.raises(ValueError, match="positive int"):
        matmul_cost(0, 3, 4, 2)
    with pytest.raises(ValueError, match="positive"):
        DeviceRates(flops=0.0)


def test_device_rates_default_off_gpu():
    if torch.cuda.is_available():
        pytest.skip("measures on a GPU here")
    assert measure_device_rates() is DEFAULT_RATES
    assert measure_device_rates("cpu") is DEFAULT_RATES


@pytest.mark.gpu
def test_device_rates_measured_on_gpu():
    rates = measure_device_rates()
    assert measure_device_rates(torch.device("cuda", torch.cuda.current_device())) is rates  # cached
    assert "measured" in rates.name
    # broad sanity bounds: any current datacenter GPU is within these
    assert 1e13 < rates.flops < 5e15 and 1e11 < rates.bandwidth < 2e13 and 1e12 < rates.flops_fp32 < rates.flops
