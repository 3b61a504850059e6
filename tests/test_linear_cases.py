"""Odd shapes, layouts and dtypes, input forms, `out=`, and integer buffers, on every CPU backend."""

import pytest
import torch
from torch import nn

import fusedmerge
from conftest import CPU_BACKENDS, assert_dicts_equal

SHAPES = [(), (0,), (3, 0), (1,), (7,), (4095,), (4096,), (4097,), (65537,), (3, 5, 7), (131073,)]


def _models(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_odd_shapes(backend, dtype, shape):
    base, *xs = _models(shape, 4, dtype)
    got = fusedmerge.average(xs, [1, 2, 3], backend=backend)
    assert got.shape == torch.Size(shape) and got.dtype == dtype
    assert torch.equal(got, fusedmerge.average(xs, [1, 2, 3], backend="torch"))
    got = fusedmerge.task_arithmetic(base, xs, 0.7, backend=backend)
    assert torch.equal(got, fusedmerge.task_arithmetic(base, xs, 0.7, backend="torch"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_views(backend):
    big = _models((64, 96), 3, torch.float32)
    views = [big[0].t(), big[1].t(), big[2].t()]
    strided = [x[::2, 1::3] for x in big]
    for xs in (views, strided):
        assert not xs[0].is_contiguous()
        got = fusedmerge.average(xs, backend=backend)
        assert torch.equal(got, fusedmerge.average([x.contiguous() for x in xs], backend="torch"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_in_one_state_dict(backend):
    g = torch.Generator().manual_seed(5)

    def model():
        return {
            "a.f32": torch.randn(300, generator=g),
            "b.bf16": torch.randn(17, 9, generator=g).bfloat16(),
            "c.f16": torch.randn(4097, generator=g).half(),
            "d.f64": torch.randn(5, generator=g).double(),
            "e.steps": torch.tensor(7),
            "f.mask": torch.tensor([True, False]),
        }

    ms = [model() for _ in range(3)]
    for m in ms:
        m["e.steps"], m["f.mask"] = ms[0]["e.steps"], ms[0]["f.mask"]
    got = fusedmerge.average(ms, [0.1, 0.2, 0.7], backend=backend)
    assert_dicts_equal(got, fusedmerge.average(ms, [0.1, 0.2, 0.7], backend="torch"))
    assert got["e.steps"].item() == 7 and got["e.steps"].data_ptr() != ms[0]["e.steps"].data_ptr()
    # one key with a different dtype per model: promoted, accumulated in fp64 when one is fp64
    mixed = [ms[0]["a.f32"].bfloat16(), ms[1]["a.f32"], ms[2]["a.f32"].half()]
    got = fusedmerge.average(mixed, backend=backend)
    assert got.dtype == torch.float32
    assert torch.equal(got, fusedmerge.average(mixed, backend="torch"))
    assert fusedmerge.average([mixed[0], mixed[1].double()], backend=backend).dtype == torch.float64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_out_dtype(backend, out_dtype):
    xs = _models((1000,), 3, torch.bfloat16)
    got = fusedmerge.task_arithmetic(xs[0], xs[1:], 0.5, out_dtype=out_dtype, backend=backend)
    assert got.dtype == out_dtype
    assert torch.equal(got, fusedmerge.task_arithmetic(xs[0], xs[1:], 0.5, out_dtype=out_dtype, backend="torch"))


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_uniform_average_is_a_drop_in_for_stack_mean(backend):
    xs = _models((2000,), 5, torch.float32)
    got = fusedmerge.average(xs, backend=backend)
    exact = torch.stack(xs).double().mean(0)
    assert (got.double() - exact).abs().max() <= 8 * 2**-24 * torch.stack(xs).abs().max()
    assert torch.allclose(got, torch.stack(xs).mean(0), rtol=1e-6, atol=1e-7)
    assert torch.equal(fusedmerge.average([xs[0]], backend=backend), xs[0])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.bn = nn.BatchNorm1d(4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_modules_give_a_new_module(backend):
    torch.manual_seed(0)
    nets = [Net() for _ in range(3)]
    merged = fusedmerge.average(nets, backend=backend)
    assert type(merged) is Net and all(merged is not n for n in nets)
    assert isinstance(merged.fc.weight, nn.Parameter)
    want = fusedmerge.average([n.state_dict() for n in nets], backend="torch")
    assert_dicts_equal(merged.state_dict(), want)
    assert merged.bn.num_batches_tracked.item() == 0
    nets[1].bn.num_batches_tracked += 1
    with pytest.raises(ValueError, match="bn.num_batches_tracked"):
        fusedmerge.average(nets, backend=backend)
    ta = fusedmerge.task_arithmetic(nets[0], [nets[0], nets[0]], 0.5, backend=backend)
    assert_dicts_equal(ta.state_dict(), nets[0].state_dict())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_writes_in_place_and_may_alias_an_input(backend, clip_tiny):
    base, models = clip_tiny
    want = fusedmerge.task_arithmetic(base, models, 0.4, backend="torch")
    out = {k: torch.empty_like(v) for k, v in base.items()}
    assert fusedmerge.task_arithmetic(base, models, 0.4, out=out, backend=backend) is out
    assert_dicts_equal(out, want)
    first = {k: v.clone() for k, v in models[0].items()}  # FusionBench's in-place merge into the first model
    fusedmerge.task_arithmetic(base, [first, *models[1:]], 0.4, out=first, backend=backend)
    assert_dicts_equal(first, want)
    x = torch.arange(10.0)
    with pytest.raises(ValueError, match="partially overlaps"):
        fusedmerge.average([x[:8], x[2:]], out=x[1:9], backend=backend)
    wide = torch.arange(20.0)
    with pytest.raises(ValueError, match="partially overlaps"):  # a strided input spanning the output
        fusedmerge.average([wide[0:20:4], wide[1:20:4]], out=wide[8:13], backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        fusedmerge.average([x[::2], x[1::2]], out=torch.empty(10)[::2], backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_inputs_and_tensors_in_one_launch(backend):
    tensors = 40 if backend == "triton" else 150  # the interpreter pays per tile: 40 tensors still share a launch
    ms = [{f"t{i}": torch.full((i + 1,), float(j)) for i in range(tensors)} for j in range(20)]
    got = fusedmerge.average(ms, backend=backend)
    assert_dicts_equal(got, fusedmerge.average(ms, backend="torch"))
    assert torch.allclose(got["t3"], torch.full((4,), 9.5))


def test_parameters_that_require_grad_give_plain_results():
    ws = [torch.nn.Parameter(torch.randn(10)) for _ in range(3)]
    for op in (lambda b: fusedmerge.average(ws, backend=b), lambda b: fusedmerge.dare(ws[0], ws[1:], 0.5, backend=b),
               lambda b: fusedmerge.ties(ws[0], ws[1:], backend=b)):
        for backend in ("torch", "cpu"):
            got = op(backend)
            assert not got.requires_grad and got.grad_fn is None


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_weighted_sum_keeps_the_coefficients_as_given(backend):
    xs = [torch.randn(37, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    got = fusedmerge.weighted_sum(xs, [0.2, 0.5, 0.1], backend=backend)
    want = (xs[0] * 0.2 + xs[1] * 0.5) + xs[2] * 0.1  # the reference's left fold, fp32, no FMA
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="weights has 2 entries"):
        fusedmerge.weighted_sum(xs, [1.0, 2.0])
