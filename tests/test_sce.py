"""SCE against mergekit 0.1.5's merge_tensors: within 1 fp32 ulp of the largest input for fp32 models
(≥ 80 % equal; fp64 mean squares here, fp32 there), within 2 bf16 ulps (≥ 80 % equal) for bf16 ones (mergekit
works in bf16); the variance against torch.var; the select_topk edges; row blocks equal to the whole tensor;
refusals."""

import pytest
import torch
from test_della import SHAPES, _models

import fusedmerge
from conftest import within_ulps
from fusedmerge.checkpoint.blocks import block_stats, spans
from fusedmerge.methods import GroupCall, _reduce, _sparse, sce
from fusedmerge.reductions import DotsJob, DotsSpec, dots_reference
from fusedmerge.reference import magnitude_view

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
        if dtype == torch.float32:  # measured over 8 seeds, 2-5 models: ≤ 0.65 ulps, ≥ 87.5 % equal
            assert within_ulps(got, want, [base[name], *inputs], 1), name
            assert float((got == want).double().mean()) >= 0.8, name
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


@pytest.mark.parametrize("models", [2, 5])
def test_variance_is_torch_vars_within_the_stated_bound(models):
    """fp32: ≤ 1 ulp from torch.var(unbiased=False) of the stacked task vectors (both the fp64 value rounded
    once) and equal on > 99.9 % of the entries (all, as measured); fp64: within 2·T·ε·(v + |μ|·√v) (measured
    ≤ 0.91·T·ε·(…)), near-equal pairs included, where torch's Welford update loses the most."""
    g = torch.Generator().manual_seed(models)
    n = 1 << 14
    base = torch.randn(n, generator=g, dtype=torch.float64) * 1e3
    taus = [base + 50 * (i + 1) * torch.randn(n, generator=g, dtype=torch.float64) - base for i in range(models)]
    taus[0][:64] = taus[1][:64] * (1 + 1e-12)
    for dtype in (torch.float32, torch.float64):
        ts = [t.to(dtype) for t in taus]
        got, want = sce.variance(ts), torch.var(torch.stack(ts), 0, unbiased=False)
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert within_ulps(got, want, [want], 1) and float((got == want).double().mean()) > 0.999
        else:
            mu = torch.stack(ts).mean(0)
            bound = 2 * models * torch.finfo(dtype).eps * (want + mu.abs() * want.sqrt())
            assert bool(((got - want).abs() <= bound).all())


def test_tied_variances_are_all_kept_and_zero_variances_only_at_select_topk_1():
    """Entries whose task vectors are all equal have variance 0: kept at select_topk = 1 (no selection, as
    mergekit), never below (k ≤ the nonzero count); equal variances everywhere tie at the k-th one and are all
    kept, giving select_topk = 1's result."""
    base = torch.zeros(40, 30)
    sign = torch.randint(0, 2, (40, 30), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    tied = [0.25 * sign, 0.25 * sign, -0.25 * sign]  # v = 8/9 · 0.0625 everywhere
    assert torch.equal(fusedmerge.sce(base, tied, select_topk=0.3), fusedmerge.sce(base, tied, select_topk=1.0))
    base, models = _models({"w": (40, 30)}, n=3, seed=4)
    still = slice(0, 10)
    for m in models[1:]:
        m["w"][still] = models[0]["w"][still]  # rows 0-9: every τᵢ equal (v = 0), not 0
    xs = [m["w"] for m in models]
    for topk in (1.0, 0.999):
        got = fusedmerge.sce(base["w"], xs, select_topk=topk)
        want = mk_api.merge_tensors([base["w"], *xs], "sce", parameters={"select_topk": topk}, base_index=0)
        assert within_ulps(got, want, [base["w"], *xs], 1)
        moved = ~torch.isclose(got[still], base["w"][still], rtol=0, atol=1e-4)
        assert bool(moved.all()) if topk == 1 else torch.equal(got[still], base["w"][still])


def _blocked(base, xs, topk, block):
    """MERGEKIT_SCE's row blocks of `block` elements over base and xs (as checkpoint/blocks.py runs them): the
    merged tensor and the last pass's statistics (threshold, Σ τ̂ᵢ²)."""
    blocks = sce.MERGEKIT_SCE.blocks
    parts = spans(base.shape, 1, block, blocks.align(base.shape, None))
    assert len(parts) >= 4
    cut = lambda t, span: {"w": t.reshape(-1)[span.first:span.first + span.numel]}  # noqa: E731
    call = lambda span: GroupCall(cut(base, span), [cut(x, span) for x in xs], [1.0] * len(xs),  # noqa: E731
                                  [None] * len(xs), {"select_topk": topk})
    stats = block_stats(blocks, parts, call)
    return torch.cat([blocks.merge(call(span), span, stats)["w"] for span in parts]).reshape(base.shape), stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_row_blocks_give_the_whole_tensors_bits(dtype, monkeypatch):
    """Blocks of 256 elements (BLOCK_CHUNK 64, pieces of 128, radix chunks of 100): the radix selection finds
    the whole tensor's k-th variance (k = 0 included: nothing kept), the chunk sums its Σ τ̂ᵢ² (one `dots` over
    the whole masked tensor), so the merge has the whole tensor's bits, selected or not. Magnitudes spread
    over 10⁶ along the tensor so that another order of summation shows."""
    monkeypatch.setattr(_reduce, "BLOCK_CHUNK", 64)
    monkeypatch.setattr(sce, "CHUNK", 128)
    monkeypatch.setattr(_sparse, "SELECT_CHUNK", 100)
    base, models = _models({"w": (37, 29)}, n=3, seed=2, dtype=dtype)
    spread = 1e3 ** (torch.arange(37, dtype=dtype) % 3).unsqueeze(1)
    b, xs = base["w"] * spread, [m["w"] * spread for m in models]
    for topk in (0.3, 1.0, 1e-4):
        whole = fusedmerge.sce(b, xs, select_topk=topk)
        blocked, (threshold, sums) = _blocked(b, xs, topk, 256)
        assert torch.equal(blocked, whole), topk
        assert (threshold is None) == (topk != 0.3) and torch.equal(whole, b) == (topk == 1e-4)
        taus = [x - b for x in xs]
        v = sce.variance(taus)
        keep = torch.full(v.shape, topk == 1) if threshold is None else magnitude_view(v) >= threshold
        assert int(keep.sum()) == int(int(torch.count_nonzero(v)) * topk)  # no ties in these variances
        want = dots_reference([DotsJob([t * keep for t in taus])], DotsSpec(((0, 0), (1, 1), (2, 2))))[0]
        assert torch.equal(sums, want), topk


@pytest.mark.parametrize("value", [0.0, 1.5, "x"])
def test_bad_select_topk_is_refused_by_name(value):
    base, models = _models({"w": (4, 4)}, n=2)
    with pytest.raises((TypeError, ValueError), match="select_topk"):
        fusedmerge.sce(base, models, select_topk=value)
