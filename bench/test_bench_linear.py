"""Averaging and task arithmetic on CLIP ViT state dicts, fusedmerge against stock torch, side by side.

Run: pytest bench/test_bench_linear.py --benchmark-json bench/results/<name>.json, then
python bench/report.py bench/results/<name>.json. Each group (model, N, dtype) also times a plain copy of
the same number of bytes: the bandwidth limit the report compares with.
"""

import pytest
import torch
from workloads import DEVICE, memory_budget, models

import fusedmerge
from fusedmerge.perf import CopyLimit, merge_bytes, sync

FUSED = [n for n, s in fusedmerge.backends().items() if s.available and DEVICE.type in s.devices
         and not (n == "triton" and DEVICE.type == "cpu")]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def fusionbench_loop(ms):
    """FusionBench's state-dict simple average: per key, sum in the input dtype, then divide."""
    out = {}
    for k in ms[0]:
        acc = ms[0][k].clone()
        for m in ms[1:]:
            acc += m[k]
        out[k] = acc / len(ms)
    return out


def stack_mean(ms):
    return {k: torch.stack([m[k] for m in ms]).mean(0) for k in ms[0]}


def foreach(ms):
    """torch._foreach_* accumulation over the key lists, in the input dtype."""
    keys = list(ms[0])
    w = 1.0 / len(ms)
    acc = torch._foreach_mul([ms[0][k] for k in keys], w)
    for m in ms[1:]:
        torch._foreach_add_(acc, [m[k] for k in keys], alpha=w)
    return dict(zip(keys, acc))


@torch.compile(dynamic=True)
def _weighted_sum(xs, w: float):
    acc = xs[0].float() * w
    for x in xs[1:]:
        acc = acc + x.float() * w
    return acc.to(xs[0].dtype)


def compiled(ms):
    """torch.compile of the per-key weighted sum (fp32 accumulation, one fused kernel per key)."""
    return {k: _weighted_sum([m[k] for m in ms], 1.0 / len(ms)) for k in ms[0]}


try:  # the real package, when installed as a bench extra
    from importlib.metadata import version

    from fusion_bench.method.simple_average import simple_average as fusionbench_simple_average

    FUSIONBENCH = f"fusionbench_{version('fusion-bench')}"
except ImportError:
    fusionbench_simple_average = None

IMPLS = {**{f"fusedmerge_{n}": (lambda n: lambda ms: fusedmerge.average(ms, backend=n))(n) for n in FUSED},
         "fusionbench_loop": fusionbench_loop, "stack_mean": stack_mean, "foreach": foreach, "compile": compiled}
if fusionbench_simple_average is not None:
    IMPLS[FUSIONBENCH] = fusionbench_simple_average
CONFIGS = [(m, n, d) for m in ("B/32", "L/14") for n in (2, 8, 20) for d in DTYPES]


def _params(name):
    from fusedmerge.synthetic import clip_vit_shapes

    return sum(torch.Size(s).numel() for s in clip_vit_shapes(name).values())


@pytest.mark.parametrize("impl", list(IMPLS) + ["copy"])
@pytest.mark.parametrize("model, n, dtype", CONFIGS, ids=[f"{m.replace('/', '')}-N{n}-{d}" for m, n, d in CONFIGS])
def test_average(benchmark, model, n, dtype, impl):
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    need = _params(model) * size * ((2 * n if impl == "stack_mean" else n) + 3)
    if need > memory_budget():
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB, more than this machine's budget")
    base, ms = models(model, n, DTYPES[dtype])
    nbytes = merge_bytes(ms)
    benchmark.group = f"average {model} N={n} {dtype}"
    benchmark.extra_info.update(op="average", model=model, n=n, dtype=dtype, bytes=nbytes, device=str(DEVICE))
    fn = CopyLimit(nbytes, DEVICE) if impl == "copy" else (lambda: IMPLS[impl](ms))

    def run():
        fn()
        sync(DEVICE)

    rounds = 3 if nbytes > 4e9 else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("impl", [f"fusedmerge_{n}" for n in FUSED] + ["eager", "copy"])
@pytest.mark.parametrize("model, n, dtype", [("B/32", 8, "fp32"), ("B/32", 8, "bf16"), ("L/14", 8, "bf16")],
                         ids=["B32-N8-fp32", "B32-N8-bf16", "L14-N8-bf16"])
def test_task_arithmetic(benchmark, model, n, dtype, impl):
    base, ms = models(model, n, DTYPES[dtype])
    nbytes = merge_bytes([base, *ms])
    benchmark.group = f"task_arithmetic {model} N={n} {dtype}"
    benchmark.extra_info.update(op="task_arithmetic", model=model, n=n, dtype=dtype, bytes=nbytes, device=str(DEVICE))

    def eager():
        """FusionBench's loop: θ0 + λ·Σ(θi − θ0), per key, in the input dtype."""
        out = {}
        for k in base:
            tv = ms[0][k] - base[k]
            for m in ms[1:]:
                tv += m[k] - base[k]
            out[k] = base[k] + 0.3 * tv
        return out

    if impl == "copy":
        fn = CopyLimit(nbytes, DEVICE)
    elif impl == "eager":
        fn = eager
    else:
        fn = lambda: fusedmerge.task_arithmetic(base, ms, 0.3, backend=impl.removeprefix("fusedmerge_"))  # noqa: E731

    def run():
        fn()
        sync(DEVICE)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
