"""CUDA and GPU-Triton backends against the reference computed on the same GPU (skipped without a GPU)."""

import pytest
import torch

import fusedmerge
from conftest import GPU_BACKENDS, assert_dicts_equal, requires_gpu, same_bits

pytestmark = requires_gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cuda(sd):
    return {k: v.cuda() for k, v in sd.items()}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_vit_b32_on_gpu(clip_b32_as, backend, dtype):
    base, models = clip_b32_as(dtype)
    base, models = _cuda(base), [_cuda(m) for m in models]
    for op in (lambda b: fusedmerge.average(models, backend=b),
               lambda b: fusedmerge.average(models, list(range(1, 9)), backend=b),
               lambda b: fusedmerge.task_arithmetic(base, models, 0.3, backend=b)):
        assert_dicts_equal(op(backend), op("torch"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (2047,), (2049,), (4097,), (1 << 20,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_odd_shapes_on_gpu(backend, shape, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(shape, device="cuda", generator=g).to(dtype) for _ in range(4)]
    for op in (lambda b: fusedmerge.average(xs[1:], [1, 2, 3], backend=b),
               lambda b: fusedmerge.task_arithmetic(xs[0], xs[1:], 0.7, out_dtype=torch.bfloat16, backend=b)):
        assert same_bits(op(backend), op("torch"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_and_side_stream(backend):
    xs = [torch.randn(300, 200, device="cuda").t() for _ in range(3)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = fusedmerge.average(xs, backend=backend)
    stream.synchronize()
    assert torch.equal(got, fusedmerge.average([x.contiguous() for x in xs], backend="torch"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_over_2_pow_31_elements(backend):
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 2:
        pytest.skip(f"needs {5 * n * 2 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").fill_(1.5)
    b = torch.empty(n, dtype=torch.bfloat16, device="cuda").fill_(2.5)
    a[-3:] = 7.0
    got = fusedmerge.average([a, b], backend=backend)
    assert got[0].item() == 2.0 and got[(1 << 31) + 17].item() == 2.0 and got[-1].item() == 4.75
    assert torch.equal(got[-(1 << 20):], fusedmerge.average([a[-(1 << 20):], b[-(1 << 20):]], backend="torch"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dare_and_ties_on_gpu(clip_b32_as, backend, dtype):
    base, models = clip_b32_as(dtype)
    keys = [k for k in base if ".layers.1." in k or "embeddings" in k]
    base = {k: base[k].cuda() for k in keys}
    models = [{k: m[k].cuda() for k in keys} for m in models]
    for rescale in (True, "l1"):
        dare = lambda b: fusedmerge.dare(base, models, 0.9, scaling=1 / 8, seed=2, rescale=rescale,  # noqa: E731
                                         backend=b)
        if backend == "cuda" and rescale == "l1":  # no CUDA C++ L1 kernel yet: the explicit choice says so
            with pytest.raises(RuntimeError, match="no L1-norm kernel"):
                dare(backend)
            assert_dicts_equal(dare("auto"), dare("torch"))  # auto hands the norms to Triton
            continue
        assert_dicts_equal(dare(backend), dare("torch"))
    if backend == "triton":
        for options in (dict(), dict(scope="model", vote_tie="majority", merge="mean"), dict(dare_p=0.8)):
            ties = lambda b: fusedmerge.ties(base, models, density=0.2, backend=b, **options)  # noqa: E731
            assert_dicts_equal(ties(backend), ties("torch"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dare_low_halves_decide_ties_on_gpu(backend):
    """Thresholds at and just above element k's U: the GPU kernels must draw the low halves there."""
    from fusedmerge.philox import mask_key, random_words

    numel = 100_003
    u = random_words(mask_key(4, 0, "w"), numel)
    ones, zeros = {"w": torch.ones(numel, device="cuda")}, {"w": torch.zeros(numel, device="cuda")}
    for k in (0, 17, 4099, numel - 1):
        for t in (int(u[k]), int(u[k]) + 1):
            got = fusedmerge.dare(zeros, [ones], t / 2**32, rescale=False, seed=4, backend=backend)["w"]
            assert torch.equal(got.cpu(), (u >= t).float()), (k, t)
