"""SCE against mergekit 0.1.5's merge_tensors: bit for bit for fp32 models, within 2 bf16 ulps of the
largest input (≥ 80 % equal) for bf16 ones (mergekit works in bf16), the select_topk edges, refusals."""

import pytest
import torch
from test_della import SHAPES, _models

import fusedmerge

mk_api = pytest.importorskip("mergekit.merge_methods.api")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_equals_mergekit_on_clip_and_llama_shaped_tensors(topk, dtype):
    """bf16 with selection: against mergekit in fp32 (dtype=float32) rounded to bf16 — fusedmerge's
    arithmetic — away from entries whose variance ties the k-th one (all kept here, torch.topk's pick there;
    bf16 deltas are coarse and tie often)."""
    base, models = _models(SHAPES, n=3, seed=6, dtype=dtype)
    for name in SHAPES:
        inputs = [m[name] for m in models]
        fp32 = dtype == torch.bfloat16 and topk < 1
        want = mk_api.merge_tensors([base[name], *inputs], "sce", parameters={"select_topk": topk}, base_index=0,
                                    dtype=torch.float32 if fp32 else None).to(dtype)
        got = fusedmerge.sce(base[name], inputs, select_topk=topk)
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(got, want), name
        elif fp32:
            var = torch.var(torch.stack([x.float() - base[name].float() for x in inputs]), 0, unbiased=False)
            kth = var.flatten().sort(descending=True).values[int(int(torch.count_nonzero(var)) * topk) - 1]
            same = var != kth
            assert float(same.double().mean()) > 0.9 and float((got == want)[same].double().mean()) > 0.99, name
        else:
            scale = torch.stack([t.float().abs() for t in (base[name], *inputs)]).amax(0)
            ulps = (got.float() - want.float()).abs() / 2.0 ** (torch.frexp(scale)[1] - 8)
            assert float(ulps.max()) <= 2 and float((ulps == 0).double().mean()) > 0.8, name


def test_tiny_select_topk_keeps_nothing_and_equal_models_give_the_base():
    base, models = _models({"w": (10, 10)}, n=2, seed=1)
    assert torch.equal(fusedmerge.sce(base, models, select_topk=0.004)["w"], base["w"])  # ⌊100·0.004⌋ = 0
    same = [models[0], models[0]]
    want = mk_api.merge_tensors([base["w"], same[0]["w"], same[1]["w"]], "sce", parameters={"select_topk": 0.5},
                                base_index=0)
    assert torch.equal(fusedmerge.sce(base, same, select_topk=0.5)["w"], want)  # zero variance: nothing selected


@pytest.mark.parametrize("value", [0.0, 1.5, "x"])
def test_bad_select_topk_is_refused_by_name(value):
    base, models = _models({"w": (4, 4)}, n=2)
    with pytest.raises((TypeError, ValueError), match="select_topk"):
        fusedmerge.sce(base, models, select_topk=value)
