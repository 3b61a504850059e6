"""Property-based: random shapes, dtypes, weights and backends equal the reference bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedmerge
from conftest import CPU_BACKENDS, same_bits

AVAILABLE = [p.values[0] for p in CPU_BACKENDS if not any(m.args and m.args[0] for m in p.marks)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)
finite_weights = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def problems(draw):
    shape = draw(shapes)
    n = draw(st.integers(1, 6))
    dtypes = [draw(st.sampled_from(DTYPES)) for _ in range(n + 1)]
    weights = draw(st.lists(finite_weights, min_size=n, max_size=n).map(lambda w: w if sum(w) != 0 else [1.0] + w[1:]))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    tensors = [(torch.randn(shape, generator=g) * scale).to(dt) for dt in dtypes]
    out_dtype = draw(st.sampled_from([None] + DTYPES))
    return tensors[0], tensors[1:], weights, out_dtype, draw(st.floats(-2, 2, allow_nan=False, width=32))


@pytest.mark.skipif(not AVAILABLE, reason="no fused CPU backend available")
@settings(max_examples=150, deadline=None)
@given(problem=problems(), backend=st.sampled_from(AVAILABLE or ["torch"]))
def test_random_problems_equal_the_reference(problem, backend):
    base, xs, weights, out_dtype, scaling = problem
    got = fusedmerge.average(xs, weights, out_dtype=out_dtype, backend=backend)
    want = fusedmerge.average(xs, weights, out_dtype=out_dtype, backend="torch")
    assert same_bits(got, want)
    got = fusedmerge.task_arithmetic(base, xs, scaling, weights=weights, out_dtype=out_dtype, backend=backend)
    want = fusedmerge.task_arithmetic(base, xs, scaling, weights=weights, out_dtype=out_dtype, backend="torch")
    assert same_bits(got, want)
