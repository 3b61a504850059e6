"""fusedmerge.integrations.mergekit against mergekit's own methods (mergekit from PyPI, a test extra):
merge_state_dicts gives mergekit's results for the deterministic methods (fp32 inputs: up to rounding),
statistically equivalent and reproducible ones for DARE, and mergekit-yaml runs on the fused kernels."""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mergekit")

from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.api import merge_state_dicts  # noqa: E402

from fusedmerge.checkpoint.model_dir import ModelDir  # noqa: E402
from fusedmerge.integrations import mergekit as fused  # noqa: E402
from fusedmerge.synthetic import llama_shapes, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def prefixed():
    names = fused.install(replace=False, seed=11)
    yield names
    fused.uninstall()


def models(n=3, seed=0, shapes=((48, 40), (40,), (7, 5, 3))):
    g = torch.Generator().manual_seed(seed)
    base = {f"w{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    out = {"base": base}
    for j in range(n):
        out[f"m{j}"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    return out


def both(method, parameters, ms=None, base="base"):
    ms = ms or models()
    kwargs = dict(parameters=parameters, base=base)
    return (merge_state_dicts(ms, registry.get("fused_" + method), **kwargs),
            merge_state_dicts(ms, registry.get(method), **kwargs))


DETERMINISTIC = {
    "linear": ({"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}}, None),
    "linear_unnormalised": ({"weight": {"m0": 0.2, "m1": 0.5, "m2": 0.1}, "normalize": False}, None),
    "task_arithmetic": ({"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}, "lambda": 0.7}, "base"),
    "task_arithmetic_normalised": ({"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}, "normalize": True}, "base"),
    "ties": ({"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}, "density": {"m0": 0.3, "m1": 0.5, "m2": 0.2},
              "lambda": 0.9}, "base"),
    "ties_unnormalised": ({"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}, "density": 0.4, "normalize": False}, "base"),
    "ties_rescaled": ({"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}, "density": {"m0": 0.3, "m1": 0.5, "m2": 1.5},
                       "rescale": True}, "base"),
}


@pytest.mark.parametrize("case", list(DETERMINISTIC))
def test_deterministic_methods_give_mergekit_results(case):
    parameters, base = DETERMINISTIC[case]
    ms = models()
    if base is None:
        ms.pop("base")
    method = case.split("_unnormalised")[0].split("_normalised")[0].split("_rescaled")[0]
    got, want = both(method, parameters, ms, base)
    assert set(got) == set(want)
    compared = 0
    for k in want:
        same = ~_threshold_ties(ms, k, parameters) if method == "ties" else torch.ones_like(want[k], dtype=torch.bool)
        if parameters.get("rescale") and not same.all():
            continue  # a tie kept at the threshold changes the L1 rescale factor of every entry of that tensor
        torch.testing.assert_close(got[k][same], want[k][same], rtol=1e-5, atol=1e-6, msg=k)
        assert same.double().mean() > 0.99
        compared += 1
    assert compared >= 2


def _threshold_ties(ms, key, parameters):
    """Entries where some model's |τ| equals another's at its TIES threshold: fusedmerge keeps every tie
    there, mergekit the first ones in sort order (a documented difference)."""
    tied = torch.zeros_like(ms["base"][key], dtype=torch.bool)
    density = parameters["density"]
    for name in [n for n in ms if n != "base"]:
        d = min(density[name] if isinstance(density, dict) else density, 1.0)  # ≥ 1 keeps all
        mag = (ms[name][key] - ms["base"][key]).abs()
        k = max(1, int(d * mag.numel()))
        threshold = mag.flatten().sort(descending=True).values[k - 1]
        if (mag == threshold).sum() > 1:
            tied |= mag == threshold
    return tied


def test_replace_puts_fused_methods_under_mergekit_names_and_uninstall_restores():
    original = registry.get("ties")
    fused.install(replace=True)
    try:
        assert isinstance(registry.get("ties"), fused.FusedGeneralizedTaskArithmetic)
        assert registry.get("ties") is not original
    finally:
        fused.uninstall()
        fused.install(replace=False, seed=11)
    assert registry.get("ties") is original


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_linear_keeps_the_l1_norm_and_the_keep_rate_and_is_reproducible(density):
    """One model, mergekit's L1 rescale: ‖merged − θ0‖₁ = λ‖τ‖₁ per tensor for both implementations, and the
    kept fraction is `density` within a binomial bound; only the fused masks repeat run after run."""
    ms = models(1, shapes=((200, 150),))
    params = {"weight": 1.0, "density": density, "lambda": 0.5}
    got, want = both("dare_linear", params, ms)
    tau = ms["m0"]["w0"] - ms["base"]["w0"]
    n = tau.numel()
    for out in (got, want):
        delta = out["w0"] - ms["base"]["w0"]
        assert float(delta.abs().sum()) == pytest.approx(0.5 * float(tau.abs().sum()), rel=1e-4)
        kept = (delta != 0).double().mean().item()
        assert abs(kept - density) < 5 * math.sqrt(density * (1 - density) / n)
    again, _ = both("dare_linear", params, ms)
    assert torch.equal(again["w0"], got["w0"])


def test_dare_ties_is_statistically_mergekit_dare_ties():
    ms = models(3, shapes=((300, 200),))
    params = {"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}, "density": 0.4}
    got, want = both("dare_ties", params, ms)
    a, b = got["w0"] - ms["base"]["w0"], want["w0"] - ms["base"]["w0"]
    assert abs((a != 0).double().mean() - (b != 0).double().mean()) < 0.02
    assert abs(float(a.norm() / b.norm()) - 1) < 0.05


def test_dare_with_differing_densities_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="one density"):
        both("dare_linear", {"weight": 1.0, "density": {"m0": 0.3, "m1": 0.5, "m2": 0.5}})


def test_mergekit_yaml_on_the_fused_methods_equals_fusedmerge_merge(tmp_path):
    shapes = llama_shapes(hidden=64, layers=2, intermediate=128, vocab=96)
    write_checkpoint(str(tmp_path / "base"), shapes)
    for i in range(2):
        write_checkpoint(str(tmp_path / f"m{i}"), shapes, i)
    cfg = tmp_path / "ties.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                   f"  - model: {tmp_path / 'm0'}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
                   f"  - model: {tmp_path / 'm1'}\n    parameters: {{weight: 0.5, density: 0.3}}\n"
                   "parameters: {lambda: 0.8}\ndtype: bfloat16\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for cmd in ([sys.executable, "-m", "fusedmerge.integrations.mergekit", str(cfg), str(tmp_path / "mk")],
                [sys.executable, "-m", "fusedmerge", "merge", str(cfg), str(tmp_path / "fm"), "--quiet"]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
    a, b = ModelDir(str(tmp_path / "mk")), ModelDir(str(tmp_path / "fm"))
    assert set(a.where) == set(b.where)
    assert all(torch.equal(a.tensor(k), b.tensor(k)) for k in b.where)
