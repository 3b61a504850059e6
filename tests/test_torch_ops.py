"""torch.ops.fusedmerge.*: registered custom ops that pass torch.library.opcheck, equal the Python ops bit
for bit, and run inside torch.compile(fullgraph=True) code."""

import pytest
import torch

import fusedmerge
from fusedmerge.opcm import project


def _inputs(seed=0, n=3, shape=(33, 17), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return base, [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


OPS = {
    "average": lambda b, xs: ((xs, [1.0, 2.0, 0.5]), fusedmerge.average(xs, [1.0, 2.0, 0.5])),
    "task_arithmetic": lambda b, xs: ((b, xs, 0.3, [1.0, 2.0, 0.5]),
                                      fusedmerge.task_arithmetic(b, xs, 0.3, weights=[1.0, 2.0, 0.5])),
    "dare": lambda b, xs: ((b, xs, 0.7, 0.5, None, True, 3, "w"), fusedmerge.dare(b, xs, 0.7, scaling=0.5, seed=3, name="w")),
    "ties": lambda b, xs: ((b, xs, 0.3, 0.8, [1.0, 0.5, 2.0], "mean", None, 0, "w"),
                           fusedmerge.ties(b, xs, density=0.3, scaling=0.8, weights=[1.0, 0.5, 2.0], merge="mean", name="w")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", list(OPS))
def test_ops_pass_opcheck_and_equal_the_python_ops(op, dtype):
    base, xs = _inputs(dtype=dtype)
    args, want = OPS[op](base, xs)
    got = getattr(torch.ops.fusedmerge, op)(*args)
    assert got.dtype == want.dtype and torch.equal(got, want)
    torch.library.opcheck(getattr(torch.ops.fusedmerge, op), args)


def test_opcm_project_op():
    merged, task = torch.randn(2, 24, 12, dtype=torch.float64), torch.randn(2, 24, 12, dtype=torch.float64)
    got = torch.ops.fusedmerge.opcm_project(merged, task, 0.4, "paper")
    assert torch.equal(got, project(merged, task, 0.4, variant="paper"))
    torch.library.opcheck(torch.ops.fusedmerge.opcm_project, (merged, task, 0.4, "paper"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_inside_torch_compile_fullgraph(backend):
    base, xs = _inputs(1)

    def merge(base, xs):
        avg = torch.ops.fusedmerge.average(xs, None)
        ta = torch.ops.fusedmerge.task_arithmetic(base, xs, 0.5, None)
        dropped = torch.ops.fusedmerge.dare(base, xs, 0.5, 1.0, None, True, 7, "layer")
        return (avg * 2 + ta - dropped).relu()

    torch._dynamo.reset()
    compiled = torch.compile(merge, fullgraph=True, backend=backend)
    assert torch.equal(compiled(base, xs), merge(base, xs))
