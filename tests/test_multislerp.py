"""Multi-SLERP against mergekit 0.1.5's multislerp (merge_tensors, the plugin) on random and Llama/CLIP-shaped
tensors, 1–5 models, with and without a base, fp32 and bf16: within 4 ulps at the tensor's largest input
magnitude (mergekit computes in the inputs' dtype and keeps its tangent step's rounding noise; fusedmerge
uses the closed form); the cancelling case and bad input."""

import pytest
import torch

import fusedmerge
from conftest import MODEL_SHAPES, within_ulps

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
ULPS = 4


def _models(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"random": (40, 24), **MODEL_SHAPES}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: (v + 0.3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(n)]
    return {k: v.to(dtype) for k, v in base.items()}, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_equals_mergekit_within_the_bound(dtype, n, with_base):
    base, models = _models(n, dtype, seed=n)
    weights = [0.5 + 0.25 * i for i in range(n)]
    got = fusedmerge.multislerp(base if with_base else None, models, weights)
    for k in base:
        tensors = ([base[k]] if with_base else []) + [m[k] for m in models]
        want = mergekit_api.merge_tensors(tensors, "multislerp", parameters={"weight": weights},
                                          base_index=0 if with_base else None)
        assert within_ulps(got[k], want, tensors, ULPS), (k, (got[k].double() - want.double()).abs().max())
    if n == 1:
        assert all(torch.equal(got[k], models[0][k]) for k in base)


def test_options_and_cancelling_inputs():
    a = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = [0.2, 0.3]
    want = mergekit_api.merge_tensors([a, b], "multislerp", parameters={"weight": w, "normalize_weights": False})
    assert torch.allclose(fusedmerge.multislerp(None, [a, b], w, normalize_weights=False), want, rtol=0, atol=1e-12)
    # antipodal with equal weights: two inputs fall back to the weighted sum, more raise as mergekit does
    assert torch.allclose(fusedmerge.multislerp(None, [a, -a]), torch.zeros(30, dtype=torch.float64), atol=1e-15)
    with pytest.raises(ValueError, match="weighted sum of the unit inputs of 'tensor' is zero"):
        fusedmerge.multislerp(None, [a, -a, a, -a])


def test_plugin_registers_multislerp():
    from fusedmerge.integrations import mergekit as plugin

    base, models = _models(3, torch.float32, seed=4)
    tensors = [base["random"]] + [m["random"] for m in models]
    params = {"weight": [1.0, 2.0, 0.5]}
    try:
        assert "fm_multislerp" in plugin.install(replace=False, prefix="fm_")
        want = mergekit_api.merge_tensors(tensors, "multislerp", parameters=params, base_index=0)
        got = mergekit_api.merge_tensors(tensors, "fm_multislerp", parameters=params, base_index=0)
        assert within_ulps(got, want, tensors, ULPS)
    finally:
        plugin.uninstall()


def test_bad_input_is_named():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="weights has 1 entries"):
        fusedmerge.multislerp(None, [a, a], [1])
    with pytest.raises(TypeError, match="normalize_weights"):
        fusedmerge.multislerp(None, [a, a], normalize_weights=1)
