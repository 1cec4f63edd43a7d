"""The low-precision criterion itself (helpers.assert_close_lowp): it accepts the plain low-precision
result and one that truncates instead of rounding (the interpreter), and rejects a kernel result that
is 1.5 ulps off, which a plain relative tolerance accepts."""

import pytest
import torch

from helpers import assert_close, assert_close_lowp


@pytest.fixture(params=[torch.bfloat16, torch.float16])
def case(request):
    dtype = request.param
    exact = torch.randn(4096, dtype=torch.float64) * torch.logspace(-3, 1, 4096, dtype=torch.float64)
    return dtype, exact, exact.to(dtype)  # the plain result: the exact value rounded to the dtype


def _truncate(x64, dtype):
    """Round toward zero to `dtype`, as bf16 stores under Triton's interpreter do."""
    rounded = x64.to(dtype)
    over = rounded.double().abs() > x64.abs()
    toward_zero = torch.where(over, rounded.double() - torch.sign(x64) * _ulp(rounded), rounded.double())
    return toward_zero.to(dtype)


def _ulp(x):
    eps = torch.finfo(x.dtype).eps
    exponent = torch.floor(torch.log2(x.double().abs().clamp_min(torch.finfo(x.dtype).tiny)))
    return torch.exp2(exponent) * eps


def test_accepts_the_plain_result(case):
    dtype, exact, naive = case
    assert_close_lowp(naive, exact, naive)


def test_accepts_a_truncating_kernel(case):
    dtype, exact, naive = case
    truncated = _truncate(exact, dtype)
    assert not torch.equal(truncated, naive)  # it differs from the plain result somewhere
    assert_close_lowp(truncated, exact, naive)


def test_rejects_a_perturbed_kernel_that_a_plain_rtol_accepts(case):
    dtype, exact, naive = case
    perturbed = naive.clone()
    picked = torch.arange(0, 4096, 97)
    perturbed[picked] = (naive[picked].double() + 1.5 * _ulp(naive[picked])).to(dtype)  # 1.5 ulp off
    assert_close(perturbed, exact.to(dtype), dtype=dtype)  # the plain rtol/atol of the table accepts it
    with pytest.raises(AssertionError, match="beyond 2.0x the plain"):
        assert_close_lowp(perturbed, exact, naive)
