"""fusedmerge.integrations.fusion_bench against FusionBench's own algorithms (fusion-bench from PyPI, a test
extra) on a small CLIPVisionModel pool: equal results for the deterministic methods (up to fp32 rounding of
the accumulation), statistically equivalent DARE, OPCM within tolerance of FusionBench's loop, inplace
semantics as FusionBench's, usable through `_target_`."""

import copy
import logging
import math
import random
import subprocess
import sys

import pytest
import torch

fb = pytest.importorskip("fusion_bench")
transformers = pytest.importorskip("transformers")

from fusion_bench.method import (  # noqa: E402
    SimpleAverageAlgorithm,
    TaskArithmeticAlgorithm,
    TiesMergingAlgorithm,
    WeightedAverageAlgorithm,
)
from fusion_bench.method.dare import DareTaskArithmetic, DareTiesMerging  # noqa: E402

from conftest import tiny_clip_modules  # noqa: E402
from fusedmerge.integrations import fusion_bench as fused  # noqa: E402
from fusedmerge.opcm import linear_weights, opcm_reference  # noqa: E402
from fusedmerge.opcm.merger import nonleaf_params  # noqa: E402

logging.getLogger("fusion_bench").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def clip_pool():
    base, models = tiny_clip_modules(4)

    def make(n=4):
        """A fresh dict pool (FusionBench's algorithms modify the models they are given)."""
        return {"_pretrained_": copy.deepcopy(base), **{f"task{i}": copy.deepcopy(m) for i, m in enumerate(models[:n])}}

    return base, models, make


def sd(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_close(got, want, rtol=2e-6, atol=1e-7):
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=k)


CASES = {
    "simple_average": (lambda: fused.FusedSimpleAverage(inplace=False), lambda: SimpleAverageAlgorithm(inplace=False)),
    "weighted_average": (lambda: fused.FusedWeightedAverage(normalize=True, weights=[1, 2, 3, 0.5]),
                         lambda: WeightedAverageAlgorithm(normalize=True, weights=[1, 2, 3, 0.5])),
    "weighted_unnormalised": (lambda: fused.FusedWeightedAverage(normalize=False, weights=[0.1, 0.2, 0.3, 0.4]),
                              lambda: WeightedAverageAlgorithm(normalize=False, weights=[0.1, 0.2, 0.3, 0.4])),
    "task_arithmetic": (lambda: fused.FusedTaskArithmetic(scaling_factor=0.3, inplace=False),
                        lambda: TaskArithmeticAlgorithm(scaling_factor=0.3, inplace=False)),
}
for merge_func in ("sum", "mean", "max"):
    CASES[f"ties_{merge_func}"] = (
        lambda mf=merge_func: fused.FusedTiesMerging(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func=mf),
        lambda mf=merge_func: TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func=mf))


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_algorithms_give_fusion_bench_results(clip_pool, case):
    _, _, make = clip_pool
    ours, theirs = CASES[case]
    pool = make()
    before = {name: sd(m) for name, m in pool.items()}
    got = ours().run(pool)
    assert isinstance(got, transformers.CLIPVisionModel)
    for name, m in pool.items():  # the inputs are untouched
        assert_close(sd(m), before[name], rtol=0, atol=0)
    assert_close(sd(got), sd(theirs().run(make())))


def test_inplace_writes_where_fusion_bench_writes(clip_pool):
    _, _, make = clip_pool
    pool = make()
    got = fused.FusedSimpleAverage(inplace=True).run(pool)
    assert got is pool["task0"]
    assert_close(sd(got), sd(SimpleAverageAlgorithm(inplace=False).run(make())))
    pool = make()
    got = fused.FusedTaskArithmetic(scaling_factor=0.3, inplace=True).run(pool)
    assert got is pool["_pretrained_"]


def test_usable_through_target_in_a_method_config(clip_pool):
    from fusion_bench.utils import instantiate

    _, _, make = clip_pool
    algorithm = instantiate({"_target_": "fusedmerge.integrations.fusion_bench.FusedTaskArithmetic",
                             "scaling_factor": 0.3, "inplace": False})
    assert isinstance(algorithm, fb.BaseAlgorithm)
    pool = fb.BaseModelPool(make())
    assert_close(sd(algorithm.run(pool)), sd(TaskArithmeticAlgorithm(scaling_factor=0.3, inplace=False).run(make())))


def _kept(merged, base, key):
    return (merged[key] != base[key]).double().mean().item()


@pytest.mark.parametrize("only_linear", [False, True])
def test_dare_is_statistically_fusion_bench_dare(clip_pool, only_linear):
    """One model: merged − θ0 = λ·keep⊙τ/(1−p). Kept entries carry FusionBench's value λτ/(1−p), the keep rate
    is 1−p within a binomial bound for both, and with only_on_linear_weights the other entries are exact."""
    base_module, _, make = clip_pool
    p, lam = 0.6, 0.7
    base = sd(base_module)
    tau = {k: v - base[k] for k, v in sd(make(1)["task0"]).items()}
    ours = sd(fused.FusedDareTaskArithmetic(lam, p, only_linear, seed=1).run(make(1)))
    theirs = sd(DareTaskArithmetic(scaling_factor=lam, sparsity_ratio=p, only_on_linear_weights=only_linear).run(
        fb.BaseModelPool(make(1))))
    linear = set(linear_weights(base_module))
    dropped_keys = [k for k in base if not only_linear or k in linear]
    for got in (ours, theirs):
        n = sum(base[k].numel() for k in dropped_keys)
        kept = sum(_kept(got, base, k) * base[k].numel() for k in dropped_keys) / n
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        for k in base:
            expect = base[k] + lam * tau[k] / ((1 - p) if k in dropped_keys else 1)
            changed = got[k] != base[k]
            torch.testing.assert_close(got[k][changed], expect[changed], rtol=1e-5, atol=1e-6, msg=k)
            if k not in dropped_keys:
                assert changed.float().mean() > 0.99, k
    again = sd(fused.FusedDareTaskArithmetic(lam, p, only_linear, seed=1).run(make(1)))
    assert_close(again, ours, rtol=0, atol=0)  # reproducible


def test_dare_simple_average_is_dare_task_arithmetic_over_n(clip_pool):
    _, _, make = clip_pool
    a = sd(fused.FusedDareSimpleAverage(0.5, False, seed=4).run(make()))
    b = sd(fused.FusedDareTaskArithmetic(0.25, 0.5, False, seed=4).run(make()))
    assert_close(a, b, rtol=0, atol=0)


def test_dare_ties_is_statistically_fusion_bench_dare_ties(clip_pool):
    base_module, _, make = clip_pool
    base = sd(base_module)
    args = dict(sparsity_ratio=0.5, only_on_linear_weights=False, rescale=True, scaling_factor=0.3, threshold=20,
                remove_keys=[], merge_func="sum")
    ours = sd(fused.FusedDareTies(**args, seed=2).run(make()))
    theirs = sd(DareTiesMerging(**args).run(fb.BaseModelPool(make())))
    delta = lambda m: torch.cat([(m[k] - base[k]).flatten() for k in base])  # noqa: E731
    a, b = delta(ours), delta(theirs)
    assert abs((a != 0).double().mean() - (b != 0).double().mean()) < 0.01
    assert abs(a.norm() / b.norm() - 1) < 0.05


def test_opcm_follows_fusion_bench_loop_and_task_order(clip_pool):
    """fusion-bench 0.2.33's OPCMForCLIP cannot run here (its module imports CLIPVisionTransformer, gone in
    transformers 5, and it needs its program's task pool): the reference is opcm_reference, its loop
    transcribed, with its non-leaf quirk and its seeded task order."""
    base_module, models, make = clip_pool
    merged = fused.FusedOPCM(alpha=0.5, shuffle_order=True, seed=3).run(make())
    names = [f"task{i}" for i in range(4)]
    random.seed(3)
    random.shuffle(names)
    base = sd(base_module)
    order = [sd(models[int(n[4:])]) for n in names]
    frozen = set(nonleaf_params(list(base), base_module))
    linear = set(linear_weights(base_module))
    *_, want = opcm_reference(base, order, 0.5, projectable=lambda k: k in linear, frozen=lambda k: k in frozen)
    got = sd(merged)
    num = math.sqrt(sum(float((got[k] - want[k]).norm()) ** 2 for k in base))
    den = math.sqrt(sum(float((want[k] - base[k]).norm()) ** 2 for k in base))
    assert num < 1e-4 * den
    assert [k for k in frozen if k.endswith("embeddings.class_embedding")]  # the quirk is exercised


def test_importing_fusedmerge_imports_neither_peer():
    code = ("import sys, fusedmerge, fusedmerge.cli, fusedmerge.opcm, fusedmerge.checkpoint.merge; "
            "bad = [m for m in ('fusion_bench', 'mergekit') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
