"""The CPU `dots` launch's per-row trees over chunk sums (csrc/cpu/dots_cpu.cpp: the chunk list and each row's
tree over its chunks in C++) against the reference, bit for bit: rows of 0 to 40 chunks (counts that are not
powers of two, short last chunks), many rows and jobs of different input counts in one call, empty rows and
tensors, sums that are zero (returned as +0); and `tree_sum`'s equal-count path against its general one."""

import torch

from fusedmerge import dispatch
from fusedmerge.perf import same_bits
from fusedmerge.reductions import DotsJob, DotsSpec, tree_sum

CHUNK = 1024


def test_many_rows_of_many_chunks_equal_the_reference():
    g = torch.Generator().manual_seed(3)
    spec = DotsSpec(((0, 1), (1, 1), (2, 0), (0, 0)))
    jobs = []
    cols = [1, 5, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK - 7, 7 * CHUNK, 13 * CHUNK + 100, 40 * CHUNK - 1, 0]
    for k, n in enumerate(cols):
        rows = (1, 2, 5)[k % 3]
        for n_inputs, dtype in ((3, torch.float32), (4, torch.bfloat16)):
            scale = 10.0 ** torch.randint(-3, 3, (n_inputs, 1, 1), generator=g)
            xs = (torch.randn(n_inputs, rows, n, generator=g) * scale).to(dtype)
            base = torch.randn(rows, n, generator=g).to(dtype) if k % 2 else None
            jobs.append(DotsJob(list(xs), base, rows))  # input counts interleaved in the launch
    # zero sums: of -0 products, and of products that cancel exactly across chunks
    z = torch.full((2, 3 * CHUNK), -0.0)
    x = torch.ones(2 * CHUNK + 3)
    y = torch.cat([x[:CHUNK + 1], -x[:CHUNK + 1], x[:1] * 0])
    jobs += [DotsJob([z, torch.zeros_like(z), z], None, 2), DotsJob([x, y, x]), DotsJob([torch.zeros(0, 4)] * 3, None, 0)]
    want = dispatch.run("dots", jobs, "torch", spec)
    got = dispatch.run("dots", jobs, "cpu", spec)
    for job, a, b in zip(jobs, got, want):
        assert a.shape == (job.rows, len(spec.pairs)) and same_bits(a, b), (tuple(job.inputs[0].shape), job.rows)
    assert same_bits(got[-3], torch.zeros(2, 4, dtype=torch.float64))
    assert same_bits(got[-2][:, 0], torch.zeros(1, dtype=torch.float64))


def test_tree_sum_of_equal_counts_equals_the_general_path():
    g = torch.Generator().manual_seed(4)
    for count in (1, 2, 3, 6, 13, 32):
        values = torch.randn(5 * count, 3, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-6, 6, (5 * count, 1))
        values[:count] = -0.0
        equal = tree_sum(values, torch.full((5,), count))
        general = tree_sum(torch.cat([values, values[:1]]), torch.tensor([count] * 5 + [1]))[:5]
        assert same_bits(equal, general) and torch.equal(equal[0], equal[0].abs())
