"""One AdaMerging step's merge work on CLIP ViT-B/32 shapes, 8 tasks, layer-wise, fp32: the forward merge
(θ_l = θ0_l + Σᵢ λᵢ,l·τᵢ,l) plus the coefficient backward (∂L/∂λᵢ,l = ⟨g_l, τᵢ,l⟩ for a given upstream
gradient g per merged tensor), excluding the model's own forward and backward. Side by side: fusedmerge's
FusedLayerWiseMergedModel and FusionBench 0.2.33's LayerWiseMergedModel, built from the same modules.

Time per step (best of the rounds) and peak extra memory of one step, starting from base + task vectors +
the upstream gradients held (the merged copy the step makes is counted). Issue targets: ≥ 3× faster;
memory = base + task vectors + one merged copy (extra ≈ one model).
"""

import pytest
import torch
from torch import nn
from workloads import DEVICE, peak_extra_memory

from fusedmerge import FusedLayerWiseMergedModel
from fusedmerge.perf import sync
from fusedmerge.synthetic import clip_vit_base

TASKS = 8
MODEL = "B/32"


def _module(state):
    """An nn.Module holding `state` as parameters at its dotted names."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, nn.Module())
            m = getattr(m, p)
        m.register_parameter(leaf, nn.Parameter(value))
    return root


def _workload():
    base = {k: v.to(DEVICE) for k, v in clip_vit_base(MODEL).items()}
    g = torch.Generator().manual_seed(1)
    delta = {k: (torch.randn(v.shape, generator=g) * 1e-3).to(DEVICE) for k, v in base.items()}
    finetuned = [_module({k: base[k] + (i + 1) * delta[k] for k in base}) for i in range(TASKS)]
    upstream = {k: (torch.randn(v.shape, generator=g) * 1e-2).to(DEVICE) for k, v in base.items()}
    return _module(base), finetuned, upstream


@pytest.mark.parametrize("impl", ["fused", "fusionbench"])
def test_adamerging_step(benchmark, impl):
    if impl == "fusionbench":
        cls = pytest.importorskip("fusion_bench.models.wrappers.layer_wise_fusion").LayerWiseMergedModel
    else:
        cls = FusedLayerWiseMergedModel
    pretrained, finetuned, upstream = _workload()
    layers = len(upstream)
    model = cls(torch.full((TASKS, layers), 0.3, device=DEVICE), pretrained, finetuned, clamp_weights=False)
    names = list(upstream)

    def step():
        model.merge_weight.grad = None
        merged = model.merge_weights()
        torch.autograd.backward([merged[k] for k in names], [upstream[k] for k in names])
        sync(DEVICE)
        model._merged_state_dict = None  # the next step starts from base + task vectors only

    step()
    peak = peak_extra_memory(step)
    assert model.merge_weight.grad.shape == (TASKS, layers)
    benchmark.group = f"adamerging step {MODEL} {TASKS} tasks layer-wise fp32"
    benchmark.extra_info.update(op=f"adamerging_{impl}", model=MODEL, tasks=TASKS, device=str(DEVICE),
                                peak_extra_mb=round(peak / 2**20), per="step",
                                model_mb=round(sum(t.numel() * 4 for t in upstream.values()) / 2**20))
    benchmark.pedantic(step, rounds=3 if impl == "fusionbench" else 5, warmup_rounds=0, iterations=1)


def test_fusion_bench_adamerging_code_builds_the_fused_model():
    """Not a timing: FusionBench's own LayerWiseAdaMergingAlgorithm / TaskWiseAdaMergingAlgorithm model
    construction inside fused_adamerging() gives fusedmerge's model with FusionBench's merged weights (names
    restored after). Here rather than in tests/ because importing fusion_bench.method.adamerging (Lightning,
    transformers) takes ~20 s on this machine, over the unit tests' budget."""
    import copy
    from types import SimpleNamespace

    from fusion_bench.method.adamerging import layer_wise_adamerging as lw
    from fusion_bench.method.adamerging import task_wise_adamerging as tw

    from fusedmerge import FusedTaskWiseMergedModel
    from fusedmerge.integrations.fusion_bench import fused_adamerging

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    models = [copy.deepcopy(base) for _ in range(3)]
    for m in models:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    pool = SimpleNamespace(model_names=["a", "b", "c"],
                           load_model=lambda n: copy.deepcopy(base if n == "_pretrained_" else models["abc".index(n)]))
    algo = SimpleNamespace(config=SimpleNamespace(weights=None, init_values=0.3, clamp_weights=True, tie_weights=False,
                                                  strict=True))
    for construct in (lw.LayerWiseAdaMergingAlgorithm.construct_layer_wise_merged_model,
                      tw.TaskWiseAdaMergingAlgorithm.construct_task_wise_merged_model):
        want = construct(algo, pool).merge_weights()
        with fused_adamerging():
            got = construct(algo, pool)
        assert isinstance(got, (FusedLayerWiseMergedModel, FusedTaskWiseMergedModel))
        for k, v in got.merge_weights().items():
            assert torch.equal(v.detach(), want[k].detach()), k
    assert lw.LayerWiseMergedModel.__module__.startswith("fusion_bench")
    assert tw.TaskWiseMergedModel.__module__.startswith("fusion_bench")
