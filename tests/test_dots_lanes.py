"""The CPU `dots` kernel's vectorised tree (csrc/cpu/dots_cpu.cpp: parts of a chunk in the lanes, a scalar
tree for short chunks) against the reference, bit for bit: every length to 300 and random ones to 3000
(tails that are not powers of two, partial last chunks), fp32/bf16/fp64 inputs, bases of other dtypes,
per tensor and per row."""

import torch

from fusedmerge import _cpu, dispatch
from fusedmerge.perf import same_bits
from fusedmerge.reductions import DotsJob, DotsSpec


def check(seed: int = 0) -> None:
    """Raises AssertionError naming the first job whose sums differ from the reference."""
    g = torch.Generator().manual_seed(seed)
    lengths = list(range(1, 301)) + torch.randint(301, 3001, (40,), generator=g).tolist() + [1023, 1025, 2048]
    kinds = [(torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
             (torch.float64, torch.float32), (torch.float32, torch.float64), (torch.bfloat16, None)]
    # inputs in several pairs (0-3, widened once) and in one (4-7), on either side of a pair
    spec = DotsSpec(((0, 1), (0, 2), (1, 1), (3, 2), (0, 4), (5, 0), (6, 7)))
    jobs = []
    for k, n in enumerate(lengths):
        dtype, base_dtype = kinds[k % len(kinds)]
        rows = 3 if k % 5 == 0 else 1
        scale = 10.0 ** torch.randint(-4, 4, (8, 1), generator=g)
        xs = (torch.randn(8, rows * n, generator=g) * scale).to(dtype)
        base = None if base_dtype is None else torch.randn(rows * n, generator=g).to(base_dtype)
        jobs.append(DotsJob(list(xs.reshape(8, rows, n)), None if base is None else base.reshape(rows, n), rows))
    want = dispatch.run("dots", jobs, "torch", spec)
    got = dispatch.run("dots", jobs, "cpu", spec)
    for job, a, b in zip(jobs, got, want):
        assert same_bits(a, b), (f"{_cpu.isa()}: {job.inputs[0].dtype} x{tuple(job.inputs[0].shape)}, base "
                                 f"{None if job.base is None else job.base.dtype}: {a.tolist()} != {b.tolist()}")


def test_every_length_dtype_and_base_equals_the_reference():
    """In the ISA build this CPU runs (tests/test_build.py runs a shorter dots check in each)."""
    check()
