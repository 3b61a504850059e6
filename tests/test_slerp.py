"""SLERP against the real peers: mergekit 0.1.5's slerp (merge_tensors, the plugin, mergekit-yaml configs
through `fusedmerge merge`) and FusionBench 0.2.33's slerp_utils.slerp / SlerpMergeAlgorithm, within the
stated bound (their coefficients come from fp32 sums, fusedmerge's from the fp64 dots primitive: 4 ulps of
max(|a|, |b|) in fp32/fp64, 1 in bf16); edge cases (collinear, zero, empty) and bad input."""

import copy
import math

import pytest
import torch

import fusedmerge
from conftest import load_model_dir
from fusedmerge import cli

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
slerp_utils = pytest.importorskip("fusion_bench.method.slerp.slerp_utils")


def _pair(shape, dtype, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a.to(dtype), (a + scale * torch.randn(shape, generator=g)).to(dtype)


CASES = {
    "random": lambda dtype: _pair((64, 33), dtype),
    "far apart": lambda dtype: _pair((257,), dtype, scale=3.0),
    "collinear": lambda dtype: (lambda a: (a, (2.5 * a.float()).to(dtype)))(_pair((40, 7), dtype)[0]),
    "opposite": lambda dtype: (lambda a: (a, (-a.float()).to(dtype)))(_pair((40, 7), dtype)[0]),
    "zero base": lambda dtype: (torch.zeros(5, 6, dtype=dtype), _pair((5, 6), dtype)[1]),
    "both zero": lambda dtype: (torch.zeros(9, dtype=dtype), torch.zeros(9, dtype=dtype)),
    "empty": lambda dtype: (torch.zeros(0, 3, dtype=dtype), torch.zeros(0, 3, dtype=dtype)),
}


def _bits_equal(got, want):
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[got.element_size()]
    return got.dtype == want.dtype and got.shape == want.shape and torch.equal(got.view(ints), want.view(ints))


ULPS = {torch.float32: 4, torch.float64: 4, torch.bfloat16: 1}


def _close(got, want, a, b):
    """Within ULPS[dtype] units in the last place of max(|a|, |b|), elementwise (the stated bound)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    scale = torch.maximum(a.double().abs(), b.double().abs()).clamp(min=torch.finfo(want.dtype).tiny)
    return bool(((got.double() - want.double()).abs() <= ULPS[want.dtype] * torch.finfo(want.dtype).eps * scale).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.3])
def test_equals_mergekit_within_the_bound(case, dtype, t):
    a, b = CASES[case](dtype)
    want = mergekit_api.merge_tensors([a, b], "slerp", parameters={"t": t}, base_index=0)
    got = fusedmerge.slerp(a, [b], t)
    assert _close(got, want, a, b), (case, (got.double() - want.double()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c != "empty"])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7])
def test_equals_fusionbench_within_the_bound(case, dtype, t):
    """FusionBench returns fp32 for 16-bit inputs and load_state_dict rounds it once to the model's dtype."""
    a, b = CASES[case](dtype)
    want = slerp_utils.slerp(t, a, b).to(dtype)
    got = fusedmerge.slerp(a, [b], t, variant="fusionbench")
    assert _close(got, want, a, b), (case, (got.double() - want.double()).abs().max())


def test_ends_and_interpolation_angle():
    a, b = _pair((300,), torch.float64, scale=1.0)
    b = b * (a.norm() / b.norm())  # on one sphere, where the interpolated angle is t·θ
    assert torch.equal(fusedmerge.slerp(a, [b], 0.0), a)
    assert torch.allclose(fusedmerge.slerp(a, [b], 1.0), b, rtol=0, atol=1e-12)
    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    theta = math.acos(cos(a, b))
    mid = fusedmerge.slerp(a, [b], 0.25)
    assert math.isclose(math.acos(cos(a, mid)), 0.25 * theta, rel_tol=1e-9)


def test_plugin_registers_slerp_and_keeps_mergekits_results():
    from fusedmerge.integrations import mergekit as plugin

    rows_a, rows_b = _pair((3, 50, 20), torch.bfloat16, seed=4)
    try:
        names = plugin.install(replace=False, prefix="fm_")
        assert "fm_slerp" in names
        for a, b in [(rows_a[0], rows_b[0]), (rows_a, rows_b)]:
            want = mergekit_api.merge_tensors([a, b], "slerp", parameters={"t": 0.4}, base_index=0)
            got = mergekit_api.merge_tensors([a, b], "fm_slerp", parameters={"t": 0.4}, base_index=0)
            assert _close(got, want, a, b)
        single = mergekit_api.merge_tensors([rows_a[0], rows_b[0]], "fm_slerp", parameters={"t": 0.4}, base_index=0)
        assert _bits_equal(single, fusedmerge.slerp(rows_a[0], [rows_b[0]], 0.4))
        sds = [{"x": rows_a[0], "y": rows_a[1]}, {"x": rows_b[0], "y": rows_b[1]}]
        want = mergekit_api.merge_state_dicts(sds, "slerp", parameters={"t": 0.6}, base=0)
        got = mergekit_api.merge_state_dicts(sds, "fm_slerp", parameters={"t": 0.6}, base=0)
        assert all(_close(got[k], want[k], sds[0][k], sds[1][k]) for k in want)
    finally:
        plugin.uninstall()


def test_fusionbench_class_equals_slerp_merge_algorithm():
    pytest.importorskip("transformers")
    from fusion_bench import BaseModelPool
    from fusion_bench.method import SlerpMergeAlgorithm

    from conftest import tiny_clip_modules
    from fusedmerge.integrations.fusion_bench import FusedSlerpMerge

    _, models = tiny_clip_modules(2, seed=3)
    pool = lambda: {"a": models[0], "b": models[1]}  # noqa: E731
    got = FusedSlerpMerge(t=0.35).run(pool()).state_dict()
    want = SlerpMergeAlgorithm(t=0.35).run(BaseModelPool({k: copy.deepcopy(m) for k, m in pool().items()})).state_dict()
    assert list(got) == list(want)
    sds = [m.state_dict() for m in models]
    assert all(_close(got[k], want[k], sds[0][k], sds[1][k]) for k in want if want[k].is_floating_point())


@pytest.fixture
def ckpts(small_llama_ckpts):
    return small_llama_ckpts


def test_merge_cli_runs_mergekits_slerp_config(ckpts, tmp_path):
    """The base listed among the models, as mergekit configs do; the output equals mergekit's per tensor."""
    cfg = tmp_path / "slerp.yml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {ckpts / 'base'}\nmodels:\n  - model: {ckpts / 'base'}\n"
                   f"  - model: {ckpts / 'm0'}\nparameters:\n  t: 0.4\ndtype: bfloat16\n")
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet", "--memory-budget", "64KB"]) == 0
    got, base, other = load_model_dir(tmp_path / "out"), load_model_dir(ckpts / "base"), load_model_dir(ckpts / "m0")
    assert list(got) == list(base)
    for k in base:
        want = mergekit_api.merge_tensors([base[k], other[k]], "slerp", parameters={"t": 0.4}, base_index=0)
        assert _close(got[k], want, base[k], other[k]), k


@pytest.mark.parametrize("text, message", [
    ("merge_method: slerp\nbase_model: @B\nmodels: [{model: @B}, {model: @M0}]\n", "needs parameters.t"),
    ("merge_method: slerp\nbase_model: @B\nmodels: [{model: @M0}, {model: @M1}]\nparameters: {t: 0.5}\n",
     "exactly one other model"),
    ("merge_method: slerp\nbase_model: @B\nmodels: [{model: @M0}]\nparameters: {t: [0, x]}\n", "parameters.t[1]"),
    ("merge_method: slerp\nbase_model: @B\nmodels: [{model: @M0, parameters: {weight: 1}}]\nparameters: {t: 0.5}\n",
     "unsupported key"),
    ("merge_method: slerp\nmodels: [{model: @M0}]\nparameters: {t: 0.5}\n", "needs a base_model"),
])
def test_bad_slerp_configurations_are_refused(ckpts, tmp_path, capsys, text, message):
    for token, name in (("@M0", "m0"), ("@M1", "m1"), ("@B", "base")):
        text = text.replace(token, str(ckpts / name))
    cfg = tmp_path / "c.yml"
    cfg.write_text(text)
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_api_input_is_named():
    a, b = _pair((4,), torch.float32)
    with pytest.raises(ValueError, match="exactly one model"):
        fusedmerge.slerp(a, [b, b], 0.5)
    with pytest.raises(ValueError, match="unknown variant"):
        fusedmerge.slerp(a, [b], 0.5, variant="numpy")
    with pytest.raises(ValueError, match="t must be finite"):
        fusedmerge.slerp(a, [b], math.inf)
