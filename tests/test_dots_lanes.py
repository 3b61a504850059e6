"""The CPU `dots` kernel's vectorised tree (csrc/cpu/dots_cpu.cpp: parts of a chunk in the lanes, a scalar
tree for short chunks) against the reference, bit for bit: every length to 300 and random ones to 3000
(tails that are not powers of two, partial last chunks), fp32/bf16/fp64 inputs, bases of other dtypes,
per tensor and per row, in every ISA build this CPU runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedmerge import _cpu, dispatch
from fusedmerge.perf import same_bits
from fusedmerge.reductions import DotsJob, DotsSpec


def check(seed: int = 0) -> str:
    """Raises AssertionError naming the first job whose sums differ from the reference; returns the ISA."""
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
    return _cpu.isa()


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_length_dtype_and_isa_equals_the_reference(isa):
    supported = {"baseline": ["baseline"], "avx2": ["baseline", "avx2"], "avx512": ["baseline", "avx2", "avx512"]}
    if isa not in supported[_cpu.isa()]:
        pytest.skip(f"this CPU runs at most the {_cpu.isa()} variant")
    if isa == _cpu.isa():
        assert check() == isa
        return
    env = {**os.environ, "FUSEDMERGE_CPU_ISA": isa, "PYTHONPATH": str(Path(__file__).parent)}
    code = "import test_dots_lanes as t; print(t.check())"
    root = Path(__file__).parent.parent  # this checkout's fusedmerge, as the in-process run uses
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == isa
