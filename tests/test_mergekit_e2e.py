"""`fusedmerge merge` against mergekit 0.1.5's own merge (mergekit.merge.run_merge, in process: what
mergekit-yaml runs) for every mergekit method fusedmerge carries out, on tiny generated Llama-shaped
checkpoints (fp32 and bf16), with slices and layer ranges, gradient lists, {filter, value} settings and both
`dtype:` kinds spread over the configurations. Compared: tensor names, dtypes, shapes, values within each
method's documented rounding (ulps of the output dtype at the tensor's largest magnitude), or, for the
random methods at density < 1, their statistics; and the output config.json."""

import json
import math

import pytest
import torch
import yaml

from conftest import load_model_dir as load
from fusedmerge import cli
from fusedmerge.synthetic import llama_shapes, write_checkpoint

pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

SHAPES = llama_shapes(hidden=64, layers=4, intermediate=128, vocab=128)
MODELS = ("base", "m0", "m1", "m2")

# name: (configuration; "@32/" and "@16/" stand for the fp32 and bf16 checkpoints' directory), bound:
# ulps of the output dtype (None: the random methods' statistics). bf16 checkpoints merged as bfloat16 are
# the usual case (mergekit then computes most methods in bf16, fusedmerge in fp32 rounded once); the methods
# that trim by magnitude (TIES, Breadcrumbs, SCE) read fp32 checkpoints, where |τ| has no ties at a threshold
# (bf16 models tie there often: kept here, cut by sort order in mergekit — README).
CASES = {
    "linear": ("""
merge_method: linear
models:
  - {model: @16/m0, parameters: {weight: 0.3}}
  - {model: @16/m1, parameters: {weight: [{filter: mlp, value: 0.7}, {value: 1.0}]}}
dtype: bfloat16
""", 1),
    "task_arithmetic": ("""
merge_method: task_arithmetic
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: [0.2, 1.0]}}
  - {model: @32/m1, parameters: {weight: 0.5}}
parameters: {lambda: 0.8}
dtype: float32
""", 2),
    "ties": ("""
merge_method: ties
base_model: @32/base
slices:
  - sources:
      - {model: @32/base, layer_range: [0, 2]}
      - {model: @32/m0, layer_range: [0, 2], parameters: {density: [0.3, 0.8]}}
      - {model: @32/m1, layer_range: [2, 4], parameters: {weight: [{filter: mlp, value: 0.5}, {value: 1.2}]}}
  - sources:
      - {model: @32/base, layer_range: [2, 4]}
      - {model: @32/m0, layer_range: [2, 4]}
      - {model: @32/m1, layer_range: [0, 2]}
parameters: {density: 0.6, weight: 1.0, lambda: 0.9}
dtype: float32
""", 2),
    "ties_rescale_kept_above_one": ("""
merge_method: ties
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 1.0, density: 0.4}}
  - {model: @32/m1, parameters: {weight: 0.5, density: [0.6, 0.2]}}
  - {model: @32/m2, parameters: {weight: 0.7, density: 1.5}}
parameters: {rescale: true}
dtype: float32
""", 2),
    "task_arithmetic_slice_base": ("""
merge_method: task_arithmetic
slices:
  - sources:
      - {model: @32/base, layer_range: [0, 4]}
      - {model: @32/m0, layer_range: [0, 4], parameters: {weight: 5e-1}}
      - {model: @32/m1, layer_range: [0, 4], parameters: {weight: ["1e-1", 1]}}
    base_model: @32/base
parameters: {int8_mask: true, rescale: true}
dtype: float32
""", 2),
    "linear_float64": ("""
merge_method: linear
models:
  - {model: @32/m0, parameters: {weight: 1.0}}
  - {model: @32/m1, parameters: {weight: 0.3}}
dtype: float64
""", 2),
    "dare_linear": ("""
merge_method: dare_linear
base_model: @16/base
models:
  - {model: @16/m0, parameters: {weight: [0.5, 1.0]}}
  - {model: @16/m1, parameters: {weight: 0.7}}
parameters: {density: 1.0}
dtype: bfloat16
""", 1),
    "dare_linear_random": ("""
merge_method: dare_linear
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 1.0}}
  - {model: @32/m1, parameters: {weight: [{filter: mlp, value: 0.5}, {value: 0.8}]}}
parameters: {density: 0.4, lambda: 0.9}
dtype: float32
""", None),
    "dare_ties_random": ("""
merge_method: dare_ties
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 1.0}}
  - {model: @32/m1, parameters: {weight: 0.5}}
parameters: {density: 0.6}
dtype: float32
""", None),
    "slerp": ("""
merge_method: slerp
base_model: @32/m0
slices:
  - sources:
      - {model: @32/m0, layer_range: [0, 4]}
      - {model: @32/m1, layer_range: [0, 4]}
    parameters: {t: [{filter: self_attn, value: [0, 0.5, 1]}]}
parameters: {t: [{filter: mlp, value: [0.2, 0.9]}, {value: 0.3}]}
dtype: float32
""", 4),
    "nuslerp": ("""
merge_method: nuslerp
base_model: @16/base
models:
  - {model: @16/m0, parameters: {weight: [0.2, 0.9]}}
  - {model: @16/m1, parameters: {weight: 0.6}}
dtype: bfloat16
""", 1),
    "nuslerp_rows": ("""
merge_method: nuslerp
models:
  - {model: @32/m0, parameters: {weight: 0.3}}
  - {model: @32/m1, parameters: {weight: [{filter: mlp, value: 0.2}, {value: 0.9}]}}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
dtype: float32
""", 4),
    "multislerp": ("""
merge_method: multislerp
models:
  - {model: @32/m0, parameters: {weight: 1.0}}
  - {model: @32/m1, parameters: {weight: [{filter: mlp, value: 2.0}, {value: 0.5}]}}
  - {model: @32/m2, parameters: {weight: 1.5}}
dtype: float32
""", 4),
    "multislerp_base": ("""
merge_method: multislerp
base_model: @16/base
models:
  - {model: @16/m0, parameters: {weight: [1, 3]}}
  - {model: @16/m1, parameters: {weight: 1.0}}
parameters: {normalize_weights: false}
dtype: bfloat16
""", 4),
    "karcher": ("""
merge_method: karcher
models:
  - {model: @16/m0}
  - {model: @16/m1}
  - {model: @16/m2}
parameters: {max_iter: 5}
dtype: bfloat16
""", 4),
    "karcher_base_slices": ("""
merge_method: karcher
base_model: @32/base
slices:
  - sources:
      - {model: @32/base, layer_range: [0, 4]}
      - {model: @32/m0, layer_range: [0, 4]}
      - {model: @32/m1, layer_range: [0, 4]}
dtype: float32
""", 4),
    "model_stock": ("""
merge_method: model_stock
base_model: @32/base
models:
  - {model: @32/m0}
  - {model: @32/m1}
  - {model: @32/m2}
dtype: float32
out_dtype: bfloat16
""", 1),
    "model_stock_rows_slices": ("""
merge_method: model_stock
base_model: @16/base
slices:
  - sources:
      - {model: @16/base, layer_range: [1, 4]}
      - {model: @16/m0, layer_range: [1, 4]}
      - {model: @16/m1, layer_range: [0, 3]}
parameters: {filter_wise: true}
dtype: bfloat16
""", 2),
    "breadcrumbs": ("""
merge_method: breadcrumbs
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 0.6, density: 0.8, gamma: 0.05}}
  - {model: @32/m1, parameters: {weight: [0.2, 0.9], density: 0.9}}
dtype: float32
""", 4),
    "breadcrumbs_ties": ("""
merge_method: breadcrumbs_ties
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 0.6, density: [{filter: mlp, value: 0.7}, {value: 0.9}], gamma: 0.02}}
  - {model: @32/m1, parameters: {weight: 1.0, density: 0.8}}
parameters: {lambda: 1.1}
dtype: float32
""", 4),
    "sce": ("""
merge_method: sce
base_model: @32/base
models:
  - {model: @32/m0}
  - {model: @32/m1}
  - {model: @32/m2}
parameters: {select_topk: [0.3, 0.8]}
dtype: float32
""", 2),
    "nearswap": ("""
merge_method: nearswap
base_model: @16/base
models:
  - {model: @16/base}
  - {model: @16/m0}
parameters: {t: [{filter: mlp, value: [0.0001, 0.001]}, {value: 0.0005}]}
dtype: bfloat16
""", 1),
    "arcee_fusion": ("""
merge_method: arcee_fusion
base_model: @16/base
models:
  - {model: @16/m0}
""", 0),
    "della": ("""
merge_method: della
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 1.0, density: 1.0, epsilon: 0.0}}
  - {model: @32/m1, parameters: {weight: [0.5, 1.5], density: 1.0, epsilon: 0.0}}
dtype: float32
""", 2),
    "della_linear_random": ("""
merge_method: della_linear
base_model: @32/base
models:
  - {model: @32/m0, parameters: {weight: 1.0, density: 0.6, epsilon: 0.1}}
  - {model: @32/m1, parameters: {weight: 0.5, density: 0.6, epsilon: 0.1}}
parameters: {lambda: 0.7}
dtype: float32
""", None),
    "passthrough": ("""
merge_method: passthrough
slices:
  - sources: [{model: @16/m0, layer_range: [0, 3]}]
  - sources: [{model: @16/m1, layer_range: [1, 4]}]
parameters:
  scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: [0.5, 0.25, 1]}, {value: 1.0}]
dtype: float32
""", 0),
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every case merged by fusedmerge and by mergekit: {name: (fusedmerge's directory, mergekit's)}. One
    thread: on a loaded machine OpenMP's waits cost ten times these tiny merges' work (results do not depend
    on the thread count)."""
    root = tmp_path_factory.mktemp("mk_e2e")
    for bits, dtype in (("32", torch.float32), ("16", torch.bfloat16)):
        for i, name in enumerate(MODELS):
            write_checkpoint(str(root / bits / name), SHAPES, i - 1, dtype=dtype, noise=2e-3)
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (text, _) in CASES.items():
            path = root / f"{name}.yml"
            path.write_text(text.replace("@", str(root) + "/"))
            mine, theirs = root / f"fm-{name}", root / f"mk-{name}"
            assert cli.main(["merge", str(path), str(mine), "--quiet"]) == 0
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(path.read_text())), str(theirs),
                      MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, lazy_unpickle=False,
                                   random_seed=0))
            out[name] = mine, theirs
    finally:
        torch.set_num_threads(threads)
    return out


def ulps(got, want):
    """|got − want| at most, in ulps of want's dtype at the tensor's largest magnitude."""
    scale = max(float(want.double().abs().max()), float(got.double().abs().max()), 1e-30)
    return float((got.double() - want.double()).abs().max()) / (torch.finfo(want.dtype).eps * scale)


def _statistics(got, want, base):
    """The random methods: the fraction of entries changed from the base, and ‖merged − θ0‖₁, over the model."""
    stats = []
    for sd in (got, want):
        changed = sum(int((sd[k] != base[k].to(sd[k].dtype)).sum()) for k in sd)
        l1 = sum(float((sd[k].double() - base[k].double()).abs().sum()) for k in sd)
        stats.append((changed / sum(sd[k].numel() for k in sd), l1))
    return stats


@pytest.mark.parametrize("name", list(CASES))
def test_merge_equals_mergekits(merged, name):
    mine, theirs = merged[name]
    got, want = load(mine), load(theirs)
    assert list(got) and set(got) == set(want)
    for k in want:
        assert (got[k].dtype, got[k].shape) == (want[k].dtype, want[k].shape), k
    bound = CASES[name][1]
    if bound is None:
        base = load(mine.parent / "32" / "base")
        (f_got, l1_got), (f_want, l1_want) = _statistics(got, want, base)
        n = sum(t.numel() for t in got.values())
        assert abs(f_got - f_want) < 6 * math.sqrt(0.25 / n) and 0.1 < f_got < 0.99
        assert l1_got == pytest.approx(l1_want, rel=0.03)
    else:
        worst = max((ulps(got[k], want[k]), k) for k in want)
        assert worst[0] <= bound, worst
    a, b = (json.loads((d / "config.json").read_text()) for d in (mine, theirs))
    a["dtype"] = a.pop("torch_dtype")  # transformers ≥ 5 writes torch_dtype as dtype
    assert {k: b.get(k) for k in a} == a
    assert a["num_hidden_layers"] == {"passthrough": 6, "model_stock_rows_slices": 3}.get(name, 4)


def _merge(root, tmp_path, text):
    path = tmp_path / "c.yml"
    path.write_text(text.replace("@", str(root) + "/"))
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    assert cli.main(["merge", str(path), str(out), "--quiet"]) == 0
    return load(out)


def test_dtype_is_what_the_inputs_are_merged_from_and_out_dtype_only_casts_the_result(merged, tmp_path):
    """As mergekit loads the inputs in `dtype:`, fp32 models merged with dtype: bfloat16 give the bits of their
    bf16 roundings (TIES: the trim sees the rounded |τ|); out_dtype: bfloat16 alone merges the fp32 values
    and rounds the result. arcee_fusion's result is fp32 under dtype: bfloat16 (mergekit's) and bf16 under
    out_dtype."""
    from fusedmerge.checkpoint import config
    from fusedmerge.checkpoint.model_dir import ModelDir
    from fusedmerge.checkpoint.plan import Plan

    root = next(iter(merged.values()))[0].parent
    ties = ("merge_method: ties\nbase_model: @{0}/base\nmodels:\n"
            "  - {{model: @{0}/m0, parameters: {{weight: 1, density: 0.3}}}}\n"
            "  - {{model: @{0}/m1, parameters: {{weight: 1, density: 0.5}}}}\n{1}: bfloat16\n")
    rounded = _merge(root, tmp_path, ties.format("16", "dtype"))
    cast = _merge(root, tmp_path, ties.format("32", "dtype"))
    late = _merge(root, tmp_path, ties.format("32", "out_dtype"))
    assert all(torch.equal(cast[k], rounded[k]) for k in rounded)
    assert all(late[k].dtype == torch.bfloat16 for k in late) and any(not torch.equal(late[k], rounded[k]) for k in late)
    for key, want in (("dtype", torch.float32), ("out_dtype", torch.bfloat16)):
        path = tmp_path / f"{key}.yml"
        path.write_text(f"merge_method: arcee_fusion\nbase_model: {root}/16/base\nmodels: [{{model: {root}/16/m0}}]\n"
                        f"{key}: bfloat16\n")
        cfg = config.load(str(path))
        dirs = [ModelDir(p) for p in cfg.paths()]
        try:
            assert Plan(cfg, dirs).dtype("lm_head.weight") == want
        finally:
            for d in dirs:
                d.close()
