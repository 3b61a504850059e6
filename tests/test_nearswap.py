"""NearSwap against mergekit 0.1.5's merge_tensors: bit for bit for fp32, within one bf16 ulp for bf16
(mergekit's bf16 maths against fp32 rounded once), and its refusals."""

import pytest
import torch
from test_della import SHAPES, _models

import fusedmerge

mk_api = pytest.importorskip("mergekit.merge_methods.api")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t", [0.02, 1e-4, 0.0])
def test_equals_mergekit(t, dtype):
    base, (model,) = _models(SHAPES, n=1, seed=8, dtype=dtype)
    model["model.norm.bias"][:5] = base["model.norm.bias"][:5]  # |a − b| = 0: the clamp at 1e-6
    for name in SHAPES:
        want = mk_api.merge_tensors([base[name], model[name]], "nearswap", parameters={"t": t}, base_index=0)
        got = fusedmerge.nearswap(base[name], [model[name]], t)
        assert got.dtype == want.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(got, want), name
        else:
            scale = torch.maximum(base[name].float().abs(), model[name].float().abs())
            assert bool(((got.float() - want.float()).abs() <= 2.0 ** (torch.frexp(scale)[1] - 8)).all()), name


def test_refusals_name_the_argument():
    base, models = _models({"w": (3,)}, n=2)
    with pytest.raises(ValueError, match="inputs"):
        fusedmerge.nearswap(base, models, 0.1)
    with pytest.raises((TypeError, ValueError), match="t"):
        fusedmerge.nearswap(base, models[:1], float("nan"))
