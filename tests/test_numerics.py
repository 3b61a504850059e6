"""Conversions and rounding of every backend against torch's own casts, over exhaustive 16-bit inputs
and adversarial fp32 values (ties, subnormals, overflow)."""

import pytest
import torch

import fusedmerge
from conftest import CPU_BACKENDS


def _all_16bit(dtype):
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    return x[~torch.isnan(x)]


def _tricky_f32():
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    hi = torch.randint(-(2**15), 2**15 - 1, (20_000,), generator=g, dtype=torch.int32)
    ties = (hi << 16) | 0x8000  # exactly halfway between two bf16 values, both parities
    near = torch.cat([ties - 1, ties + 1])
    x = torch.cat([rand, ties, near]).view(torch.float32)
    specials = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 5.96e-8, 2.98e-8, 6.1e-5, 65504.0, 65519.99,
                             65520.0, 3.4e38, -3.4e38, float("inf"), float("-inf")])
    x = torch.cat([x, specials])
    return x[~torch.isnan(x)]


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_widen_exactly(backend, dtype):
    x = _all_16bit(dtype)
    got = fusedmerge.average([x], out_dtype=torch.float32, backend=backend)
    assert torch.equal(got, x.float())
    assert torch.equal(fusedmerge.average([x], backend=backend), x)


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_16bit_is_round_to_nearest_even(backend, dtype):
    x = _tricky_f32()
    got = fusedmerge.average([x], out_dtype=dtype, backend=backend)
    assert torch.equal(got, x.to(dtype))


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_nan_and_inf_propagate(backend):
    x = torch.tensor([1.0, float("nan"), float("inf"), 2.0, float("inf")])
    y = torch.tensor([1.0, 0.0, 1.0, float("nan"), float("-inf")])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = fusedmerge.average([x.to(dtype), y.to(dtype)], backend=backend)
        assert torch.isnan(got).tolist() == [False, True, False, True, True]
        assert got[2] == float("inf") and got[0] == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_accumulates_in_fp64_and_rounds_through_fp32(backend):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5000, generator=g, dtype=torch.float64) * 1e3 for _ in range(3)]
    xs[1] = xs[1].to(torch.float32)
    for out_dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        got = fusedmerge.average(xs, [0.2, 0.3, 0.5], out_dtype=out_dtype, backend=backend)
        want = fusedmerge.average(xs, [0.2, 0.3, 0.5], out_dtype=out_dtype, backend="torch")
        assert torch.equal(got, want), out_dtype
    exact = (xs[0] * 0.2 + xs[1].double() * 0.3) + xs[2] * 0.5
    assert torch.allclose(fusedmerge.average(xs, [0.2, 0.3, 0.5], backend=backend), exact, rtol=1e-14, atol=0)
