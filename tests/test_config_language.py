"""mergekit's configuration language in `fusedmerge merge`: settings (scalars, gradients, filters) evaluated
as mergekit's evaluate_setting does; output tensors, their sources and resolved parameters as mergekit's
MergePlanner plans them (slices, precedence, renumbered layers, non-layer tensors); refusals naming the key
with nothing written; and end to end against mergekit-yaml on tiny Llama-shaped checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import load_model_dir as load
from fusedmerge import cli
from fusedmerge.checkpoint import config as merge_config
from fusedmerge.checkpoint.model_dir import ModelDir
from fusedmerge.checkpoint.params import check_setting, evaluate
from fusedmerge.checkpoint.plan import Plan
from fusedmerge.methods import Param
from fusedmerge.synthetic import llama_shapes, write_checkpoint

mk_config = pytest.importorskip("mergekit.config")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """base, m0, m1: four-layer Llama-shaped bf16 checkpoints; clip: one whose layers fusedmerge cannot map."""
    root = tmp_path_factory.mktemp("cfg_lang")
    shapes = llama_shapes(hidden=32, layers=4, intermediate=64, vocab=40)
    write_checkpoint(str(root / "base"), shapes, shard_size=20_000)
    for i in range(2):
        write_checkpoint(str(root / f"m{i}"), shapes, i, shard_size=20_000)
    write_checkpoint(str(root / "clip"), shapes, 1)
    (root / "clip" / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"]}))
    return root


def _write(path, text, ckpts):
    """The configuration `text` at `path`, "@name" standing for the checkpoint directory `name`."""
    path.write_text(text.replace("@", str(ckpts) + "/"))
    return path


SETTINGS = [0.3, 2, [0.0, 1.0], [1, 0.7, 0.1], [0, 0.5, 0.3, 0.7, 1], [], [0.25],
            {"filter": "mlp", "value": [0.2, 0.9]},
            [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": 0.25}, {"value": [1, 0]}],
            [{"filter": "layers.1.", "value": 0.1}, {"filter": "*", "value": 0.6}], [{"filter": "nothing", "value": 1}]]


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_settings_evaluate_as_mergekit_evaluates_them(setting):
    mk = mk_config.ParameterSetting
    from pydantic import TypeAdapter

    parsed = TypeAdapter(mk).validate_python(setting)
    mine = check_setting(setting, Param("number"), "parameters.x")
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight", "lm_head.weight"):
        for t in (0.0, 1 / 3, 0.5, 2 / 3, 0.999, 1.0):
            want = mk_config.evaluate_setting(name, parsed, t, validate=float)
            assert evaluate(mine, name, t) == want, (name, t)


def test_boolean_gradients_pick_values_as_mergekit():
    mine = check_setting([True, False, True], Param("bool"), "parameters.b")
    for t in (0.0, 0.4, 0.5, 0.9, 1.0):
        assert evaluate(mine, "w", t) == mk_config.evaluate_setting("w", [True, False, True], t, validate=bool)


def _mergekit_plan(path):
    """{output name: (shared parameters, {model path: per-model parameters}, [(model path, source name)])}
    from mergekit's own planner."""
    from mergekit.architecture import get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    mc = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    arch = get_architecture_info(mc, MergeOptions())
    planner = MergePlanner(mc, arch, MergeOptions(), _model_out_config(mc, arch))
    planner._plan()
    return {w.name: (dict(task.parameters.items()), {m.model.path: dict(v.items()) for m, v in task.input_parameters.items()},
                     sorted((m.model.path, x.name) for m, x in task.gather_tensors.weight_info.items()))
            for w, task in planner._tensors}


PLANS = {
    "slices, precedence and per-source filters": """
slices:
  - sources:
      - {model: @base, layer_range: [0, 2]}
      - {model: @m0, layer_range: [0, 2], parameters: {weight: [1, 0.5], density: 0.7}}
      - model: @m1
        layer_range: [0, 2]
        parameters: {weight: [{filter: layers.1., value: 0.25}]}
    parameters: {weight: 0.3, density: [{filter: mlp, value: [0.2, 0.4]}, {value: 0.9}]}
  - sources:
      - {model: @base, layer_range: [2, 4]}
      - {model: @m0, layer_range: [2, 4]}
      - {model: @m1, layer_range: [1, 3], parameters: {weight: [{filter: layers.1., value: 2}]}}
merge_method: ties
base_model: @base
parameters: {weight: 0.8, density: 0.5, lambda: [0.5, 1.5, 1], normalize: false}
""",
    "models with gradients and filters (mergekit's examples/ties.yml)": """
models:
  - {model: @m0, parameters: {density: [1, 0.7, 0.1], weight: 1.0}}
  - model: @m1
    parameters:
      density: 0.5
      weight: [{filter: mlp, value: [0, 0.3, 0.7, 1]}, {value: 0.4}]
merge_method: ties
base_model: @base
parameters: {normalize: true, int8_mask: true}
""",
    "frankenmerge with overlapping ranges": """
slices:
  - sources: [{model: @m0, layer_range: [0, 3]}]
  - sources: [{model: @m1, layer_range: [1, 4]}]
    parameters: {scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: [0.5, 1]}]}
  - sources: [{model: @m0, layer_range: [3, 4]}]
merge_method: passthrough
""",
}


@pytest.mark.parametrize("case", list(PLANS))
def test_plan_equals_mergekits_planner(ckpts, tmp_path, case):
    """Output names, their sources, and every resolved parameter equal mergekit's (as floats, exactly)."""
    path = _write(tmp_path / "c.yml", PLANS[case], ckpts)
    cfg = merge_config.load(str(path))
    dirs = [ModelDir(p) for p in cfg.paths()]
    try:
        plan = Plan(cfg, dirs)
    finally:
        for d in dirs:
            d.close()
    want = _mergekit_plan(path)
    paths = cfg.paths()
    assert [t.name for t in plan.targets] and set(plan.by_name) == set(want)
    spec = cfg.spec
    for t in plan.targets:
        shared, per_input, sources = want[t.name]
        assert sorted((paths[i], n) for i, n in t.sources) == sources, t.name
        assert set(spec.global_params) <= set(shared), t.name
        for k, p in spec.global_params.items():  # given, or the default both take
            assert dict(t.shared).get(k, p.default) == shared[k], (t.name, k)
        models = [paths[i] for i, _ in t.sources[int(t.has_base):]]
        assert sorted(models) == sorted(m for m in per_input if m != cfg.base)
        for m, given in zip(models, t.per_model):
            for k, p in spec.model_params.items():
                assert dict(given).get(k, p.default) == per_input[m][k], (t.name, m, k)
    if cfg.layered:
        assert plan.layers == sum(s.length for s in cfg.slices)


REFUSED = {
    "tokenizer_source union": ("tokenizer_source: union\n", "tokenizer_source: 'union'"),
    "tokenizer_source a model": ("tokenizer_source: @m1\n", "tokenizer surgery"),
    "tokenizer block": ("tokenizer: {source: base}\n", "tokenizer:"),
    "chat_template": ("chat_template: chatml\n", "chat_template"),
    "modules": ("modules: {text: {models: [{model: @m0}]}}\n", "modules"),
    "tokenizer_source base without base": ("@NOBASE tokenizer_source: base\n", "tokenizer_source: base needs"),
    "LoRA reference": ("@MODEL @m0+@m1\n", "LoRA"),
    "hub name": ("@MODEL someorg/somemodel\n", "not a local directory"),
    "models and slices": ("slices: [{sources: [{model: @m0, layer_range: [0, 1]}]}]\n", "exactly one of models or slices"),
    "shared key per model": ("@PARAMS {t: 0.2}\n", "models[1].parameters.t"),
    "mixed list": ("parameters: {t: [0.1, {filter: mlp, value: 1}]}\n", "parameters.t: a list must hold"),
    "filter entry extra key": ("parameters: {t: [{filter: mlp, value: 1, when: 2}]}\n", "parameters.t[0]"),
    "filter not a string": ("parameters: {t: [{filter: 3, value: 1}]}\n", "parameters.t[0].filter"),
    "nested filters": ("parameters: {t: [{filter: mlp, value: [{filter: up, value: 1}]}]}\n", "parameters.t[0].value"),
    "bad gradient value named with its filter": ("parameters: {t: [{filter: mlp, value: [0, x]}]}\n",
                                                 "parameters.t[0].value (filter 'mlp')[1]"),
}
SLERP = "merge_method: slerp\nbase_model: @base\nmodels: [{model: @base}, {model: @m0}]\nparameters: {t: 0.5}\n"


@pytest.mark.parametrize("case", list(REFUSED))
def test_keys_fusedmerge_does_not_carry_out_are_refused_naming_them(ckpts, tmp_path, capsys, case):
    extra, message = REFUSED[case]
    text = SLERP
    if extra.startswith("@NOBASE"):
        text, extra = "merge_method: linear\nmodels: [{model: @m0}]\n", extra[len("@NOBASE "):]
    elif extra.startswith("@MODEL"):
        text, extra = text.replace("{model: @m0}", "{model: " + extra[len("@MODEL "):].strip() + "}"), ""
    elif extra.startswith("@PARAMS"):
        text, extra = text.replace("{model: @m0}", "{model: @m0, parameters: " + extra[len("@PARAMS "):].strip() + "}"), ""
    if "parameters: {t:" in extra:
        text = text.replace("parameters: {t: 0.5}\n", "")
    assert cli.main(["merge", str(_write(tmp_path / "c.yml", text + extra, ckpts)), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["c.yml"]


SLICES = "slices:\n  - sources:\n      - {model: @base, layer_range: [0, 2]}\n      - {model: @m0, layer_range: [0, 2]}\n"
PLAN_REFUSED = {
    "unequal slice lengths": (SLICES.replace("[0, 2]}\n", "[0, 3]}\n", 1), "the same number of layers"),
    "base not among the sources": (SLICES.replace("@base,", "@m1,"), "slices[0]: the base model"),
    "bad layer_range": (SLICES.replace("[0, 2]", "[2, 1]", 1), "slices[0].sources[0].layer_range"),
    "layer_range beyond the model": (SLICES.replace("[0, 2]", "[3, 5]"), "has no layer 4"),
    "residual_weight": (SLICES + "    residual_weight: 0.5\n", "slices[0].residual_weight"),
    "t missing for some tensors": (SLICES + "    parameters: {t: [{filter: mlp, value: 0.5}]}\n",
                                   "needs parameters.t for model.embed_tokens.weight"),
    "slices on an unmappable architecture": (SLICES.replace("@m0,", "@clip,") + "parameters: {t: 0.5}\n",
                                             "needs layer indices"),
    "gradient on an unmappable architecture": ("models: [{model: @base}, {model: @clip}]\nparameters: {t: [0, 1]}\n",
                                               "the gradient list in parameters.t needs layer indices"),
}


@pytest.mark.parametrize("case", list(PLAN_REFUSED))
def test_bad_slices_are_refused_naming_the_key_and_nothing_is_written(ckpts, tmp_path, capsys, case):
    body, message = PLAN_REFUSED[case]
    text = "merge_method: slerp\nbase_model: @base\n" + body
    if "parameters" not in body:
        text += "parameters: {t: 0.5}\n"
    assert cli.main(["merge", str(_write(tmp_path / "c.yml", text, ckpts)), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["c.yml"]


def test_tokenizer_source_base_copies_the_base_tokenizer_and_refuses_another_vocabulary(ckpts, tmp_path, capsys):
    for name in ("base", "m0"):
        (ckpts / name / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    cfg = _write(tmp_path / "c.yml", SLERP + "tokenizer_source: base\n", ckpts)
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (ckpts / "base" / "tokenizer.json").read_bytes()
    (ckpts / "m0" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"b": 0, "a": 1}}}))
    try:
        assert cli.main(["merge", str(cfg), str(tmp_path / "out2"), "--quiet"]) == 2
        assert "tokenizer.json differs" in capsys.readouterr().err and not (tmp_path / "out2").exists()
    finally:
        for name in ("base", "m0"):
            (ckpts / name / "tokenizer.json").unlink()


END_TO_END = {
    # mergekit's examples/gradient-slerp.yml shape
    "slerp": """
slices:
  - sources:
      - {model: @base, layer_range: [0, 4]}
      - {model: @m0, layer_range: [0, 4]}
merge_method: slerp
base_model: @base
parameters:
  t:
    - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
    - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
    - value: 0.5
dtype: bfloat16
""",
    # a frankenmerge: layers of two models stacked, overlapping, scaled per filter
    "passthrough": """
slices:
  - sources: [{model: @m0, layer_range: [0, 3]}]
  - sources: [{model: @m1, layer_range: [1, 4]}]
merge_method: passthrough
parameters:
  scale: [{filter: o_proj, value: 0.5}, {filter: down_proj, value: [0.5, 0.25, 1]}, {value: 1.0}]
dtype: bfloat16
""",
    # mergekit's examples/ties.yml shape (mergekit-yaml with fusedmerge's methods installed: TIES in fp32)
    "ties": PLANS["models with gradients and filters (mergekit's examples/ties.yml)"] + "dtype: bfloat16\n",
}
MERGEKIT_YAML = """
import sys
from mergekit.scripts.run_yaml import main
args = sys.argv[1:]
while args:
    if args[0] == "--fused":
        from fusedmerge.integrations.mergekit import install
        install()
        args = args[1:]
        continue
    main.main(args=[args[0], args[1], "--quiet"], prog_name="mergekit-yaml", standalone_mode=False)
    args = args[2:]
"""


@pytest.fixture(scope="module")
def end_to_end(ckpts, tmp_path_factory):
    """Each configuration merged by `fusedmerge merge` and by mergekit-yaml (one process for all three)."""
    root = tmp_path_factory.mktemp("e2e")
    args = []
    for name, text in END_TO_END.items():
        path = root / f"{name}.yml"
        path.write_text(text.replace("@", str(ckpts) + "/"))
        assert cli.main(["merge", str(path), str(root / f"fm-{name}"), "--quiet"]) == 0
        args += (["--fused"] if name == "ties" else []) + [str(path), str(root / f"mk-{name}")]
    run = subprocess.run([sys.executable, "-c", MERGEKIT_YAML, *args], env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.parametrize("name", list(END_TO_END))
def test_merge_equals_mergekit_yaml(end_to_end, name):
    """Same tensor names, shapes, dtypes and bits (slerp and passthrough in bf16 give mergekit's own bits;
    TIES against mergekit-yaml running fusedmerge's TIES, so the planning and resolution are what differ
    if anything does), and config.json's layer count and dtype."""
    got, want = load(end_to_end / f"fm-{name}"), load(end_to_end / f"mk-{name}")
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k
    a = json.loads((end_to_end / f"fm-{name}" / "config.json").read_text())
    b = json.loads((end_to_end / f"mk-{name}" / "config.json").read_text())
    assert a["num_hidden_layers"] == b["num_hidden_layers"] == (6 if name == "passthrough" else 4)
    assert a["architectures"] == b["architectures"] and a.get("torch_dtype", a.get("dtype")) == b["dtype"]


@pytest.mark.parametrize("scale", [None, 0.5, -1.3])
def test_plugin_passthrough_gives_mergekits_bits(scale):
    from mergekit.merge_methods.api import merge_tensors

    from fusedmerge.integrations import mergekit as fused

    x = torch.randn(33, 7, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    params = {} if scale is None else {"scale": scale}
    try:
        fused.install(replace=False, prefix="cfg_")
        got = merge_tensors([x], "cfg_passthrough", parameters=params)
    finally:
        fused.uninstall()
    want = merge_tensors([x], "passthrough", parameters=params)
    assert got.dtype == want.dtype and torch.equal(got, want)


BASE_USES = {  # mergekit's OPTIONAL base (nuslerp: task vectors) and IGNORED base (karcher: one more model)
    "nuslerp": "merge_method: nuslerp\nbase_model: @base\nmodels:\n  - model: @m0\n    parameters: {weight: 0.3}\n"
               "  - model: @m1\n    parameters: {weight: 0.7}\n",
    "karcher": "merge_method: karcher\nbase_model: @base\nmodels:\n  - model: @m0\n  - model: @m1\n",
}


@pytest.mark.parametrize("name", list(BASE_USES))
def test_a_base_model_is_the_optional_base_or_one_more_model_as_in_mergekit(ckpts, tmp_path, name):
    import fusedmerge

    path = _write(tmp_path / "c.yml", BASE_USES[name], ckpts)
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    got = load(tmp_path / "out")
    base, m0, m1 = (load(ckpts / n) for n in ("base", "m0", "m1"))
    if name == "nuslerp":
        want, without = fusedmerge.nuslerp(base, [m0, m1], [0.3, 0.7]), fusedmerge.nuslerp(None, [m0, m1], [0.3, 0.7])
    else:
        want, without = fusedmerge.karcher([base, m0, m1]), fusedmerge.karcher([m0, m1])
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert any(not torch.equal(got[k], without[k]) for k in want)


def test_karchers_base_model_keeps_the_tokenizer_and_must_be_a_slice_source(ckpts, tmp_path):
    text = "merge_method: karcher\nbase_model: @base\nmodels:\n  - model: @m0\n  - model: @m1\ntokenizer_source: base\n"
    cfg = merge_config.load(str(_write(tmp_path / "a.yml", text, ckpts)))
    assert cfg.base is None and [s.path for s in cfg.slices[0].models] == [str(ckpts / n) for n in ("base", "m0", "m1")]
    sliced = ("merge_method: karcher\nbase_model: @base\nslices:\n  - sources:\n      - model: @m0\n"
              "        layer_range: [0, 4]\n      - model: @m1\n        layer_range: [0, 4]\n")
    with pytest.raises(merge_config.ConfigError, match=r"slices\[0\].*one more input of karcher"):
        merge_config.load(str(_write(tmp_path / "b.yml", sliced, ckpts)))
