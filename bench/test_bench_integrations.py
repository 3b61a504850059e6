"""fusedmerge as the backend of FusionBench and mergekit, CLIP ViT-B/32, 8 fine-tuned models, fp32:
FusionBench's own algorithms against fusedmerge.integrations.fusion_bench's on the same pool of
CLIPVisionModel modules, and mergekit's merge_state_dicts with its built-in methods against the fused ones
(fusedmerge.integrations.mergekit) on the same state dicts. Time of one run (FusionBench modifies the models
it is given, so each round gets a fresh copy of the pool, made outside the timing) and peak extra memory.
"""

import copy
import logging

import pytest
import torch
from workloads import models, peak_extra_memory

from fusedmerge.synthetic import CLIP_VIT

fb = pytest.importorskip("fusion_bench")
transformers = pytest.importorskip("transformers")
mergekit = pytest.importorskip("mergekit")

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm  # noqa: E402
from fusion_bench.method.dare import DareTaskArithmetic  # noqa: E402
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.api import merge_state_dicts  # noqa: E402

from fusedmerge.integrations import fusion_bench as fused_fb  # noqa: E402
from fusedmerge.integrations import mergekit as fused_mk  # noqa: E402

logging.getLogger("fusion_bench").setLevel(logging.ERROR)
N = 8
COPIES_FINETUNED = {"dare_task_arithmetic"}  # FusionBench's DARE subtracts the base inside the fine-tuned models


def clip_pool(copy_finetuned: bool):
    """A fresh pool of CLIPVisionModel (ViT-B/32 shapes) over the benchmark's synthetic weights: the
    pretrained model always a copy (FusionBench writes into it), the fine-tuned ones sharing the held
    weights unless `copy_finetuned`."""
    c = CLIP_VIT["B/32"]
    cfg = transformers.CLIPVisionConfig(hidden_size=c.hidden, num_hidden_layers=c.layers,
                                        intermediate_size=c.intermediate, patch_size=c.patch, image_size=c.image)
    with torch.device("meta"):
        skeleton = transformers.CLIPVisionModel(cfg).eval()
    names = set(skeleton.state_dict())
    base_sd, variants = models("B/32", N, torch.float32)

    def module(sd, clone):
        m = copy.deepcopy(skeleton)
        m.load_state_dict({k if k in names else k.removeprefix("vision_model."): v.clone() if clone else v
                           for k, v in sd.items()}, assign=True)
        return m

    return fb.BaseModelPool({"_pretrained_": module(base_sd, True),
                             **{f"task{i}": module(v, copy_finetuned) for i, v in enumerate(variants)}})


FUSION_BENCH = {
    "simple_average": (lambda: SimpleAverageAlgorithm(inplace=False), lambda: fused_fb.FusedSimpleAverage(inplace=False)),
    "task_arithmetic": (lambda: TaskArithmeticAlgorithm(scaling_factor=0.3, inplace=False),
                        lambda: fused_fb.FusedTaskArithmetic(scaling_factor=0.3, inplace=False)),
    "ties_merging": (lambda: TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum"),
                     lambda: fused_fb.FusedTiesMerging(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="sum")),
    "dare_task_arithmetic": (lambda: DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.9, only_on_linear_weights=False),
                             lambda: fused_fb.FusedDareTaskArithmetic(0.3, 0.9, False)),
}
SLOW = {("ties_merging", "fusion_bench")}


@pytest.mark.parametrize("impl", ["fusion_bench", "fusedmerge"])
@pytest.mark.parametrize("algorithm", list(FUSION_BENCH))
def test_fusion_bench_algorithm(benchmark, algorithm, impl):
    make = FUSION_BENCH[algorithm][0 if impl == "fusion_bench" else 1]
    fresh = lambda: ((clip_pool(algorithm in COPIES_FINETUNED),), {})  # noqa: E731
    pool = fresh()[0][0]
    peak = peak_extra_memory(lambda p=pool: make().run(p))
    del pool
    benchmark.group = f"FusionBench {algorithm} B/32 N={N} fp32"
    benchmark.extra_info.update(op=f"{algorithm}_{impl}", peak_extra_mb=round(peak / 2**20))
    rounds = 1 if (algorithm, impl) in SLOW else 3
    benchmark.pedantic(lambda p: make().run(p), setup=fresh, rounds=rounds, iterations=1)


MERGEKIT = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0, "lambda": 0.3},
    "ties": {"weight": 1.0, "density": 0.2},
    "dare_ties": {"weight": 1.0, "density": 0.1},
}


@pytest.mark.parametrize("impl", ["mergekit", "fusedmerge"])
@pytest.mark.parametrize("method", list(MERGEKIT))
def test_mergekit_merge_state_dicts(benchmark, method, impl):
    fused_mk.install(replace=False)
    base, variants = models("B/32", N, torch.float32)
    sds = {"base": base, **{f"m{i}": v for i, v in enumerate(variants)}}
    if method == "linear":
        sds.pop("base")
    chosen = registry.get(method if impl == "mergekit" else "fused_" + method)
    run = lambda: merge_state_dicts(sds, chosen, parameters=MERGEKIT[method],  # noqa: E731
                                    base=None if method == "linear" else "base")
    benchmark.group = f"mergekit {method} B/32 N={N} fp32"
    benchmark.extra_info.update(op=f"{method}_{impl}", peak_extra_mb=round(peak_extra_memory(run) / 2**20))
    slow = impl == "mergekit" and method in ("ties", "dare_ties")
    benchmark.pedantic(run, rounds=1 if slow else 3, iterations=1)
