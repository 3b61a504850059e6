"""The `dots` reduction primitive: fp64 sums of products per tensor or per row, the same bits on every
backend (C++, Triton, the torch reference), whatever the batching, order and chunk size; close to the exact
sum; bad jobs refused by name."""

import pytest
import torch

from conftest import CPU_BACKENDS, same_bits
from fusedmerge import dispatch
from fusedmerge.reductions import DotsJob, DotsSpec, _products, gram_matrix, gram_pairs, run_chunked, tree_sum


def _jobs(seed=0):
    """Mixed shapes, dtypes, per-tensor and per-row, with and without a base; 3 inputs each."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for shape, dtype, per_row in [((24, 33), torch.float32, False), ((3, 33), torch.float32, True),
                                  ((3000,), torch.bfloat16, False), ((2, 700), torch.float64, True),
                                  ((0, 3), torch.float32, True), ((7,), torch.float16, False),
                                  ((2, 3, 5), torch.bfloat16, False)]:
        xs = [(torch.randn(shape, generator=g) * 10.0 ** torch.randint(-3, 3, (), generator=g)).to(dtype)
              for _ in range(4)]
        rows = shape[0] if per_row else 1
        jobs += [DotsJob(xs[1:], xs[0], rows), DotsJob(xs[:3], None, rows)]
    return jobs


SPEC = DotsSpec(gram_pairs(3))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_equal_the_reference_bit_for_bit(backend):
    jobs = _jobs()
    if backend == "triton":  # the interpreter: one job of each kind (fp32, fp64 rows, bf16, fp16, empty)
        jobs = [jobs[k] for k in (0, 3, 4, 7, 8, 11)]
    want = dispatch.run("dots", jobs, "torch", SPEC)
    got = dispatch.run("dots", jobs, backend, SPEC)
    assert len(got) == len(want)
    for j, g, w in zip(jobs, got, want):
        assert g.dtype == torch.float64 and g.shape == (j.rows, len(SPEC.pairs)) and same_bits(g, w)


def test_reference_is_the_exact_sum_to_fp64_rounding():
    for job, s in zip(_jobs(1), dispatch.run("dots", _jobs(1), "torch", SPEC)):
        if not job.rows:
            continue
        acc = job.acc_dtype
        u = [(x.to(acc) - (job.base.to(acc) if job.base is not None else 0)).double().reshape(job.rows, -1)
             for x in job.inputs]
        exact = torch.stack([(u[a] * u[c]).sum(1) for a, c in SPEC.pairs], 1)
        mag = torch.stack([(u[a] * u[c]).abs().sum(1) for a, c in SPEC.pairs], 1)
        assert ((s - exact).abs() <= 16 * 2.0 ** -52 * mag).all()
        g = gram_matrix(s, 3)
        assert torch.equal(g, g.transpose(1, 2)) and torch.equal(g[:, 0, 1], s[:, 1])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_independent_of_batching_order_and_chunk(backend):
    jobs = _jobs(2)
    together = dispatch.run("dots", jobs, backend, SPEC)
    reversed_ = dispatch.run("dots", jobs[::-1], backend, SPEC)[::-1]
    alone = [dispatch.run("dots", [j], backend, SPEC)[0] for j in jobs]
    assert all(same_bits(a, b) and same_bits(a, c) for a, b, c in zip(together, reversed_, alone))
    # kernels may cut rows into chunks of any power of two: here 1 and 8 elements, each chunk's products
    # summed by the same tree (tree_sum), then tree_sum over the chunks of each row
    def launch(group, chunks, pairs, partials, acc_f64, chunk):
        for k, (t, start, n) in enumerate(chunks.tolist()):
            products = _products(group[t], pairs.tolist()).reshape(len(pairs), -1)[:, start:start + n]
            if n:
                partials[k] = tree_sum(products.T.contiguous(), torch.tensor([n]))[0]

    small = [j for j in jobs if j.inputs[0].numel() <= 200]
    want = dispatch.run("dots", small, backend, SPEC)
    for max_chunk in (1, 8):
        got = run_chunked(small, SPEC, max_chunk, launch)
        assert all(same_bits(a, b) for a, b in zip(got, want))


def test_bad_jobs_are_refused_by_name():
    x = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="inputs\\[1\\]"):
        DotsJob([x, torch.zeros(4, 5)])
    with pytest.raises(ValueError, match="base"):
        DotsJob([x], torch.zeros(6))
    with pytest.raises(ValueError, match="rows=5"):
        DotsJob([x], rows=5)
    with pytest.raises(ValueError, match="pairs"):
        DotsSpec(())
    with pytest.raises(ValueError, match="pair index 2"):
        dispatch.run("dots", [DotsJob([x, x])], "cpu", DotsSpec(((0, 2),)))
