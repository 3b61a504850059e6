"""Karcher mean against mergekit 0.1.5's karcher (merge_tensors, the plugin) on random and Llama/CLIP-shaped
tensors, 2–5 models close together and far apart, fp32 and bf16: within 4 ulps at the tensor's largest input
magnitude (mergekit rounds its units and mean to the inputs' dtype every iteration; fusedmerge iterates on
the fp64 Gram matrix); zero and opposite inputs, max_iter/tol, bad input."""

import pytest
import torch

import fusedmerge
from conftest import MODEL_SHAPES, within_ulps

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
ULPS = 4


def _models(n, dtype, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"random": (40, 24), **MODEL_SHAPES}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    return [{k: (v + spread * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_equals_mergekit_within_the_bound(dtype, n, spread):
    models = _models(n, dtype, spread, seed=n)
    got = fusedmerge.karcher(models)
    for k in models[0]:
        tensors = [m[k] for m in models]
        want = mergekit_api.merge_tensors(tensors, "karcher", parameters={})
        assert within_ulps(got[k], want, tensors, ULPS), (k, (got[k].double() - want.double()).abs().max())


@pytest.mark.parametrize("case", ["zero", "all zero", "one"])
def test_edge_cases_as_mergekit(case):
    x = torch.randn(20, generator=torch.Generator().manual_seed(1))
    tensors = {"zero": [torch.zeros(20), x, 2 * x], "all zero": [torch.zeros(20)] * 3, "one": [x]}[case]
    want = mergekit_api.merge_tensors(tensors, "karcher", parameters={})
    assert within_ulps(fusedmerge.karcher(tensors), want, tensors, ULPS)


def test_opposite_inputs_keep_the_first_direction():
    """The mean of antipodal points is undefined: μ starts at the first unit and its tangent is 0 in exact
    arithmetic (mergekit moves on its rounding noise times θ/sin θ ≈ 1e7, to an arbitrary direction)."""
    x = torch.randn(20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(fusedmerge.karcher([x, -x]), x, rtol=0, atol=1e-6)


def test_iteration_options_reach_mergekits_fixed_point():
    models = [m["random"].flatten() for m in _models(4, torch.float64, 3.0, seed=7)]
    for params in ({"max_iter": 1}, {"max_iter": 3, "tol": 1e-3}, {"max_iter": 50, "tol": 1e-12}):
        want = mergekit_api.merge_tensors(models, "karcher", parameters=params)
        got = fusedmerge.karcher(models, **params)
        assert torch.allclose(got, want, rtol=0, atol=1e-12), params
    # the fixed point: the tangent of the mean vanishes, ⟨μ, uᵢ⟩-weighted directions balance
    mu = fusedmerge.karcher(models, max_iter=50, tol=1e-14)
    mu = mu / mu.norm()
    units = [m / m.norm() for m in models]
    tangent = sum(torch.acos(mu @ u) / torch.sin(torch.acos(mu @ u)) * (u - (mu @ u) * mu) for u in units)
    assert tangent.norm() < 1e-10


def test_plugin_counts_the_base_as_a_model():
    from fusedmerge.integrations import mergekit as plugin

    tensors = [m["random"] for m in _models(3, torch.float32, 1.0, seed=5)]
    try:
        assert "fm_karcher" in plugin.install(replace=False, prefix="fm_")
        for index in (None, 0):
            want = mergekit_api.merge_tensors(tensors, "karcher", parameters={}, base_index=index)
            got = mergekit_api.merge_tensors(tensors, "fm_karcher", parameters={}, base_index=index)
            assert within_ulps(got, want, tensors, ULPS), index
    finally:
        plugin.uninstall()


def test_bad_input_is_named():
    a = torch.zeros(4)
    with pytest.raises(TypeError, match="max_iter"):
        fusedmerge.karcher([a, a], max_iter=2.5)
    with pytest.raises(ValueError, match="max_iter"):
        fusedmerge.karcher([a, a], max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        fusedmerge.karcher([a, a], tol=float("nan"))
