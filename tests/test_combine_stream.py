"""The CPU `combine` kernel's streaming stores (csrc/cpu/combine_cpu.cpp: launches writing ≥ 64 MiB bypass
the caches where an output is aligned) give the reference's bits, aligned or not, with and without a base."""

import torch

from fusedmerge import dispatch
from fusedmerge.perf import same_bits
from fusedmerge.reference import CombineJob, combine_reference


def test_streamed_outputs_equal_the_reference():
    g = torch.Generator().manual_seed(0)
    n = (1 << 23) + 77  # two outputs: a launch of 64 MiB and more, with a tail that is no whole vector
    xs = [torch.randn(n, generator=g) for _ in range(2)]
    base = torch.randn(n, generator=g)
    aligned = torch.empty(n)
    shifted = torch.empty(n + 1)[1:]  # 4 bytes past an aligned address: no streaming stores there
    small = torch.empty(1000)  # a small output of the same launch
    jobs = [CombineJob(aligned, xs, [0.3, -1.7], base), CombineJob(shifted, xs, [0.5, 0.25]),
            CombineJob(small, [x[:1000] for x in xs], [0.3, 0.7], base[:1000])]
    dispatch.run("combine", jobs, "cpu")
    for job in jobs:
        assert same_bits(job.out, combine_reference(job))
