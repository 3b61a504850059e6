"""TSV-M, Iso-C, Iso-CTS (and MagMax, WUDI) on CLIP ViT-B/32 and ViT-L/14 shapes, 8 tasks, fp32: time and peak
extra memory of one merge, fusedmerge against FusionBench 0.2.33's own functions, same device, same run.

FusionBench's CPU path runs one torch.linalg.svd per matrix and task (seconds each at these shapes), so the
models are cut to their first BLOCKS encoder blocks (every matrix shape of the model: q/k/v/out 768² or
1024², fc1, fc2, plus the embeddings); the time of a whole model is about its layer count / BLOCKS times
this. Each side is one merge from (base, 8 models) to the merged state dict: FusionBench's = state_dict_sub
per model, its function, θ0 + λ·Δ (what its algorithm's run does after loading); fusedmerge's = the API
function. WUDI runs WUDI_ITERS Adam steps (FusionBench's autograd costs ~6·T·m²·n per step). Issue targets
on this CPU: ≥ 10× faster than FusionBench for TSV-M, Iso-C and Iso-CTS, peak memory not above its.

    flock /tmp/fusedmerge-heavy.lock pytest bench/test_bench_svd.py --benchmark-json bench/results/NAME.json
"""

import pytest
from workloads import DEVICE, peak_extra_memory

import fusedmerge
from fusedmerge.perf import sync
from fusedmerge.synthetic import clip_vit_base, clip_vit_finetuned

TASKS = 8
BLOCKS = {"B/32": 1, "L/14": 1}
WUDI_ITERS = 2
_HELD = {}


def _models(model):
    if model not in _HELD:
        _HELD.clear()
        full = clip_vit_base(model)
        keep = lambda k: ".encoder.layers." not in k or int(k.split(".encoder.layers.")[1].split(".")[0]) < BLOCKS[model]  # noqa: E731
        base = {k: v.to(DEVICE) for k, v in full.items() if keep(k)}
        del full
        _HELD[model] = base, [{k: v.to(DEVICE) for k, v in clip_vit_finetuned(base, i).items()} for i in range(TASKS)]
    return _HELD[model]


def _fusion_bench(method):
    from fusion_bench.method.isotropic_merging import iso_utils
    from fusion_bench.method.magmax.magmax import _magmax_select
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.wudi.wudi import wudi_merging
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    acc = DEVICE.type
    run, scale = {
        "tsv_m": (lambda tvs: compute_and_sum_svd_mem_reduction(tvs, accelerator=acc), 1.0),
        "iso_c": (lambda tvs: iso_utils.iso_c(tvs, accelerator=acc), 1.0),
        "iso_cts": (lambda tvs: iso_utils.iso_cts(tvs, common_space_fraction=0.8, accelerator=acc), 1.0),
        "magmax": (_magmax_select, 0.5),
        "wudi": (lambda tvs: wudi_merging(tvs, accelerator=acc, iter_num=WUDI_ITERS), 1.0),
    }[method]

    def merge(base, models):
        tvs = [state_dict_sub(m, base) for m in models]
        return state_dict_add(base, state_dict_mul(run(tvs), scale))

    return merge


def _fused(method):
    kw = {"iter_num": WUDI_ITERS} if method == "wudi" else {}
    return lambda base, models: getattr(fusedmerge, method)(base, models, **kw)


CASES = [("B/32", meth) for meth in ("tsv_m", "iso_c", "iso_cts", "magmax", "wudi")]
CASES += [("L/14", meth) for meth in ("tsv_m", "iso_c", "iso_cts")]


@pytest.mark.parametrize("impl", ["fusedmerge", "fusion_bench"])
@pytest.mark.parametrize("model, method", CASES)
def test_svd_merge(benchmark, model, method, impl, capsys):
    base, models = _models(model)
    merge = (_fused if impl == "fusedmerge" else _fusion_bench)(method)
    peak = []

    def once():  # FusionBench's WUDI needs autograd; fusedmerge's functions run without it
        peak.append(peak_extra_memory(lambda: (merge(base, models), sync(DEVICE))))

    benchmark.group = f"{method} {model} {BLOCKS[model]} block(s) {TASKS} tasks fp32"
    benchmark.pedantic(once, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update(op=method, model=model, tasks=TASKS, blocks=BLOCKS[model], device=str(DEVICE),
                                peak_extra_mb=round(max(peak) / 2**20))
    capsys.readouterr()  # FusionBench prints a line per key
