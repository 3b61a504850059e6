"""Arcee Fusion against mergekit 0.1.5's merge_tensors: bit for bit (fp32 and bf16 models, fp32 result) on
tensors up to 10⁶ entries; above, the quantiles come from a sample keyed by (seed, name): reproducible,
and statistically mergekit's (its threshold and mask agree with the full-data ones, as mergekit's do)."""

import pytest
import torch
from test_della import SHAPES, _models

import fusedmerge
from fusedmerge.methods import arcee_fusion as af

mk_api = pytest.importorskip("mergekit.merge_methods.api")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_equals_mergekit_bit_for_bit(dtype):
    base, (model,) = _models(SHAPES, n=1, seed=9, dtype=dtype)
    taken = 0
    for name in SHAPES:
        want = mk_api.merge_tensors([base[name], model[name]], "arcee_fusion", base_index=0)
        got = fusedmerge.arcee_fusion(base[name], [model[name]])
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want), name
        taken += int((got != base[name].float()).sum())
    assert taken > 0


def test_sampled_quantiles_are_reproducible_and_statistically_mergekits(monkeypatch):
    import mergekit.merge_methods.arcee_fusion as mk_af

    monkeypatch.setattr(af, "SAMPLE", 20_000)  # the rule for > 10⁶ entries, on 80 000 of them
    monkeypatch.setattr(mk_af, "_QUANTILE_SAMPLE_SIZE", 20_000)
    base, (model,) = _models({"w": (200, 400)}, n=1, seed=10)
    b, x = base["w"], model["w"]
    score = af.importance(x, b).reshape(-1)
    ordered = score.sort().values
    n = ordered.numel()
    exact = ordered[n // 2] + 1.5 * (ordered[3 * (n - 1) // 4] - ordered[(n - 1) // 4])
    got = fusedmerge.arcee_fusion(b, [x], name="w", seed=1)
    assert torch.equal(got, fusedmerge.arcee_fusion(b, [x], name="w", seed=1, backend="torch"))
    assert not torch.equal(got, fusedmerge.arcee_fusion(b, [x], name="w", seed=2))
    sampled = af.sample(score, 1, "w")
    assert sampled.numel() == 20_000
    q1, median, q3 = af.quantiles(sampled, "torch")
    ours = float(median + 1.5 * (q3 - q1))
    assert abs(ours - float(exact)) < 0.05 * float(exact)
    torch.manual_seed(0)
    theirs = mk_api.merge_tensors([b, x], "arcee_fusion", base_index=0)
    for out in (got, theirs):
        kept = out != b
        assert abs(float(kept.double().mean()) - float((score >= exact).double().mean())) < 0.01
