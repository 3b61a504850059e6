"""NuSLERP against mergekit 0.1.5's nuslerp (merge_tensors, the plugin) per tensor, row and column, with and
without a base, fp32 and bf16: within 4 ulps at the tensor's largest input magnitude (measured ≤ 1.8;
mergekit computes in the inputs' dtype, fusedmerge's sums in fp64 and its combination in fp32); edge cases
and bad input."""

import pytest
import torch

import fusedmerge
from conftest import MODEL_SHAPES, within_ulps

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
ULPS = 4


def _models(shapes, dtype, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: (v + 0.3 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in base.items()} for _ in range(n)]
    return {k: v.to(dtype) for k, v in base.items()}, models


MODES = [pytest.param(True, False, id="tensor"), pytest.param(False, False, id="rows"),
         pytest.param(False, True, id="columns")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flatten, row_wise", MODES)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_equals_mergekit_within_the_bound(dtype, flatten, row_wise, with_base):
    shapes = {"random": (40, 24), **MODEL_SHAPES}
    base, (a, b) = _models(shapes, dtype)
    weights = [0.3, 0.7]
    got = fusedmerge.nuslerp(base if with_base else None, [a, b], weights, flatten=flatten, row_wise=row_wise)
    params = {"weight": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    for k in shapes:
        tensors = [base[k], a[k], b[k]] if with_base else [a[k], b[k]]
        want = mergekit_api.merge_tensors(tensors, "nuslerp", parameters=params, base_index=0 if with_base else None)
        assert within_ulps(got[k], want, tensors, ULPS), (k, (got[k].double() - want.double()).abs().max())


def test_colinear_equal_weights_and_ends():
    a = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(fusedmerge.nuslerp(None, [a, 3 * a], [1, 1]), 2 * a, rtol=0, atol=1e-12)  # colinear: lerp
    b = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(fusedmerge.nuslerp(None, [a, b], [1, 0]), a, rtol=0, atol=1e-12)
    assert torch.allclose(fusedmerge.nuslerp(None, [a, b], [0, 1]), b, rtol=0, atol=1e-12)
    assert torch.equal(fusedmerge.nuslerp(None, [a, b], [1, -1]), fusedmerge.nuslerp(None, [a, b]))  # Σw ≈ 0: t = ½


def test_plugin_registers_nuslerp():
    from fusedmerge.integrations import mergekit as plugin

    base, (a, b) = _models({"w": (20, 12)}, torch.bfloat16, seed=3)
    params = {"weight": [0.4, 0.6], "nuslerp_flatten": False}
    try:
        assert "fm_nuslerp" in plugin.install(replace=False, prefix="fm_")
        for tensors, index in (([base["w"], a["w"], b["w"]], 0), ([a["w"], b["w"]], None)):
            want = mergekit_api.merge_tensors(tensors, "nuslerp", parameters=params, base_index=index)
            got = mergekit_api.merge_tensors(tensors, "fm_nuslerp", parameters=params, base_index=index)
            assert within_ulps(got, want, tensors, ULPS)
    finally:
        plugin.uninstall()


def test_bad_input_is_named():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match="exactly two models"):
        fusedmerge.nuslerp(None, [a, a, a])
    with pytest.raises(ValueError, match="weights has 3 entries"):
        fusedmerge.nuslerp(None, [a, a], [1, 2, 3])
    with pytest.raises(TypeError, match="row_wise"):
        fusedmerge.nuslerp(None, [a, a], row_wise="yes")
