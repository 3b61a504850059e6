"""DARE and TIES on CLIP ViT-B/32 state dicts, N = 8: fusedmerge against eager peers, time and peak memory.

Ratios are to fused task arithmetic measured in the same run (the issue's targets: DARE ≤ 1.5×, TIES ≤ 3×
on this CPU). FusionBench's own ties_merging runs when fusion-bench is installed (bench extra).
"""

import pytest
import torch
from workloads import DEVICE, models, peak_extra_memory

import fusedmerge
from fusedmerge.perf import sync

try:
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector,
        ties_merging,
        vector_to_state_dict,
    )
except ImportError:
    ties_merging = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
N = 8


def eager_dare(base, ms, p=0.9):
    """FusionBench-style DARE simple average: rand_like mask per tensor, rescale, task arithmetic by 1/N."""
    out = {}
    for k in base:
        acc = None
        for m in ms:
            tau = m[k] - base[k]
            tau = tau * (torch.rand_like(tau) > p) / (1 - p)
            acc = tau if acc is None else acc + tau
        out[k] = base[k] + acc / len(ms)
    return out


def mergekit_style_ties(base, ms, density=0.2):
    """mergekit's per-tensor TIES: argsort top-k, weighted sum vote, normalised disjoint mean."""
    out = {}
    for k in base:
        deltas = []
        for m in ms:
            d = m[k] - base[k]
            keep = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
            keep[torch.argsort(d.abs().flatten(), descending=True)[: int(density * d.numel())]] = True
            deltas.append(d * keep.reshape(d.shape))
        wd = torch.stack(deltas)
        sign = wd.sum(dim=0).sign()
        sign[sign == 0] = 1
        mask = wd.sign() == sign
        out[k] = base[k] + (wd * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)
    return out


def fusionbench_ties(base, ms, k=20):
    tvs = torch.stack([state_dict_to_vector({n: m[n] - base[n] for n in base}) for m in ms])
    merged = ties_merging(tvs, reset_thresh=k, merge_func="sum")
    tv = vector_to_state_dict(merged, base)
    return {n: base[n] + 0.3 * tv[n] for n in base}


IMPLS = {
    "fused_task_arithmetic": lambda b, ms: fusedmerge.task_arithmetic(b, ms, 1 / N),
    "fusedmerge_dare": lambda b, ms: fusedmerge.dare(b, ms, 0.9, scaling=1 / N),
    "fusedmerge_ties_tensor": lambda b, ms: fusedmerge.ties(b, ms, density=0.2, scaling=0.3),
    "fusedmerge_ties_model": lambda b, ms: fusedmerge.ties(b, ms, density=0.2, scaling=0.3, scope="model"),
    "fusedmerge_dare_ties": lambda b, ms: fusedmerge.ties(b, ms, dare_p=0.9, merge="mean"),
    "eager_dare": eager_dare,
    "mergekit_style_ties": mergekit_style_ties,
}
if ties_merging is not None:
    IMPLS["fusionbench_ties"] = fusionbench_ties
SLOW = {"mergekit_style_ties", "fusionbench_ties"}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_sparse(benchmark, dtype, impl):
    if impl == "fusionbench_ties" and dtype == "bf16":
        pytest.skip("FusionBench's kthvalue has no bf16 CPU kernel")
    base, ms = models("B/32", N, DTYPES[dtype])
    benchmark.group = f"dare/ties B/32 N={N} {dtype}"

    def run():
        IMPLS[impl](base, ms)
        sync(DEVICE)

    benchmark.extra_info.update(op=impl, model="B/32", n=N, dtype=dtype, device=str(DEVICE),
                                peak_extra_mb=round(peak_extra_memory(run) / 2**20))
    if impl in SLOW:
        benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    else:
        benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
