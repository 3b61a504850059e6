"""DELLA / DELLA-linear against mergekit 0.1.5: the segmented rank (every backend, mergekit's ranks), the
keep-probability ladder mergekit draws from, the downstream arithmetic with fusedmerge's masks fed into
mergekit, the keep statistics of both, and reproducible masks (backends, key order, tensor by tensor, memory
budgets of `fusedmerge merge`)."""

import math

import pytest
import torch

import fusedmerge
from conftest import CPU_BACKENDS, assert_dicts_equal
from fusedmerge import dispatch
from fusedmerge.methods.della import as_rows, della_masks, from_rows, keep_ladder
from fusedmerge.philox import mask_key, random_words
from fusedmerge.reference import RankJob, UniformsJob, row_rank_reference

mk_api = pytest.importorskip("mergekit.merge_methods.api")


def _models(shapes, n=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
    return cast(base), [cast(m) for m in models]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_row_rank_kernels_equal_the_reference_with_ties_nan_and_both_triton_paths(backend, monkeypatch):
    values = torch.randn(7, 37).round(decimals=1)  # many equal magnitudes
    values[2, 5] = float("nan")
    values[3, :4] = -0.0
    jobs = [RankJob(v, torch.empty(v.shape, dtype=torch.int32)) for v in (values, torch.randn(1, 1), values[:, :3].contiguous())]
    if backend == "triton":
        from fusedmerge.triton_kernels import rank
        monkeypatch.setattr(rank, "COUNT_MAX", 8)  # the 37-wide rows take the tl.sort path
    dispatch.run("row_rank", jobs, backend)
    for job in jobs:
        assert torch.equal(job.out, row_rank_reference(job))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_uniforms_kernels_are_the_philox_stream(backend):
    keys = [mask_key(0, 0, "w"), next(k for k in (mask_key(1, i, "w") for i in range(64)) if k >= 1 << 63)]
    jobs = [UniformsJob(k, torch.empty(n, dtype=torch.int32)) for k, n in zip(keys, (1, 300))]
    dispatch.run("uniforms", jobs, backend)
    for job in jobs:
        assert torch.equal(job.out.to(torch.int64) & 0xFFFFFFFF, random_words(job.key, job.out.numel()))


def test_ranks_are_mergekits_and_ties_get_mergekits_set_of_ranks():
    values = torch.randn(16, 50)
    mk = torch.argsort(torch.argsort(values.abs(), dim=1), dim=1)
    assert torch.equal(row_rank_reference(RankJob(values, None)).long(), mk)
    tied = values.round(decimals=1)
    ours = row_rank_reference(RankJob(tied, None)).long()
    mk = torch.argsort(torch.argsort(tied.abs(), dim=1), dim=1)
    for r in range(tied.shape[0]):
        for m in tied[r].abs().unique():
            group = tied[r].abs() == m
            assert torch.equal(ours[r][group].sort().values, mk[r][group].sort().values)


def assert_bf16_close(got, want, inputs, name):
    """mergekit works in bf16 (each δ, product, sum and the vote rounded), fusedmerge in fp32 rounded once:
    measured in bf16 ulps of the largest input magnitude, ≥ 95 % of the entries are within 1 ulp and every
    one within 16 (a vote flipped by bf16 rounding, or cancellation in Σ wᵢδᵢ, makes the tail)."""
    scale = torch.stack([t.float().abs() for t in inputs]).amax(0)
    ulps = (got.float() - want.float()).abs() / 2.0 ** (torch.frexp(scale)[1] - 8)
    assert float((ulps <= 1).double().mean()) >= 0.95 and float(ulps.max()) <= 16, (name, ulps.max())


def _fed_mergekit(monkeypatch, base, models, params, method, name):
    """mergekit's merge_tensors with torch.bernoulli replaced by fusedmerge's masks (model order); returns the
    result and the probabilities mergekit asked to draw from."""
    taus = [as_rows(m.float() - base.float()) for m in models]
    ladders = list(zip(params["density"], params["epsilon"]))
    masks = della_masks(taus, ladders, [mask_key(3, i, name) for i in range(len(models))], "torch")
    pending = [from_rows(mk, base.shape) for mk in masks]
    asked = []

    def bernoulli(probs):
        asked.append(probs)
        return pending.pop(0).to(probs.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    out = mk_api.merge_tensors([base, *models], method, parameters=params, base_index=0, name=name)
    monkeypatch.undo()
    return out, asked, masks


SHAPES = {"vision.encoder.layers.0.mlp.fc1.weight": (64, 24), "model.layers.0.self_attn.q_proj.weight": (32, 32),
          "vision.embeddings.position_embedding": (1, 9, 16), "model.norm.bias": (48,)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_mergekit_fed_fusedmerge_masks_gives_the_same_merge(method, dtype, monkeypatch):
    """With the randomness taken out (mergekit draws fusedmerge's masks), mergekit's probabilities are the
    ladder fusedmerge draws from (within fp32 rounding; bf16 ranks are rounded by mergekit) and its merge
    is fusedmerge's: fp32 up to a few ulps; bf16 see assert_bf16_close."""
    base, models = _models(SHAPES, n=3, seed=1, dtype=dtype)
    params = {"weight": [1.0, 0.5, 2.0], "density": [0.5, 0.3, 0.6], "epsilon": [0.2, 0.1, 0.15], "lambda": 0.9}
    for name in SHAPES:
        want, asked, _ = _fed_mergekit(monkeypatch, base[name], [m[name] for m in models], params, method, name)
        got = fusedmerge.della(base[name], [m[name] for m in models], weights=params["weight"],
                               density=params["density"], epsilon=params["epsilon"], scaling=0.9,
                               normalize=method == "della", consensus=method == "della", seed=3, name=name)
        assert got.dtype == want.dtype == dtype
        taus = [as_rows(m[name].float() - base[name].float()) for m in models]
        for probs, tau, (d, e) in zip(asked, taus, zip(params["density"], params["epsilon"])):
            p = as_rows(probs.float())
            if dtype == torch.float32:
                ladder = keep_ladder(row_rank_reference(RankJob(tau, None)), d, e).double() / 2**32
                assert float((ladder - p.double()).abs().max()) < 2e-7, name
            else:
                assert float(p.min()) == pytest.approx(d - e, abs=4e-3) and float(p.max()) == pytest.approx(d + e, abs=4e-3)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6, msg=name)
        else:
            assert_bf16_close(got, want, [base[name], *(m[name] for m in models)], name)


def test_keep_ladder_matches_mergekits_probabilities_exactly_up_to_fp32():
    d, e, n = 0.4, 0.15, 1000
    ranks = torch.arange(n, dtype=torch.int32).reshape(1, n)
    ours = keep_ladder(ranks, d, e).double() / 2**32
    r = (ranks.float() + 1)
    mk = (d - e) + ((r - r.min()) / (r.max() - r.min())).clamp(0, 1) * 2 * e
    assert float((ours - mk.double()).abs().max()) < 1e-7


def test_keep_statistics_and_l1_rescale_are_mergekits():
    """One model (64 rows of 1024): per-row keep rate ≈ density, keep rate by rank decile ≈ the ladder, and
    ‖merged − θ0‖₁ = ‖τ‖₁ — for fusedmerge and for mergekit's own random draw."""
    base, (model,) = _models({"w": (64, 1024)}, n=1)
    base, model = base["w"], model["w"]
    d, e = 0.4, 0.2
    torch.manual_seed(0)
    want = mk_api.merge_tensors([base, model], "della_linear", parameters={"weight": 1.0, "density": d, "epsilon": e},
                                base_index=0)
    got = fusedmerge.della(base, [model], density=d, epsilon=e, consensus=False, seed=7)
    tau = model - base
    ranks = row_rank_reference(RankJob(tau, None)).long()
    bound = 5 * math.sqrt(0.25 / 1024)
    for out in (got, want):
        kept = (out - base) != 0
        assert float((kept.double().mean(1) - d).abs().max()) < bound
        for q in range(10):
            band = (ranks >= q * 1024 // 10) & (ranks < (q + 1) * 1024 // 10)
            rate = kept[band].double().mean()
            expect = d - e + 2 * e * (q + 0.5) / 10
            assert abs(float(rate) - expect) < 5 * math.sqrt(0.25 / band.sum()), q
        assert float((out - base).abs().double().sum()) == pytest.approx(float(tau.abs().double().sum()), rel=1e-4)


def test_density_one_prunes_nothing_and_equals_mergekit():
    base, models = _models({"w": (20, 30), "b": (30,)}, n=3, seed=4)
    for method in ("della", "della_linear"):
        want = mk_api.merge_state_dicts({"base": base, **{f"m{i}": m for i, m in enumerate(models)}}, method,
                                        parameters={"weight": {"m0": 1.0, "m1": 0.5, "m2": 2.0}}, base="base")
        got = fusedmerge.della(base, models, weights=[1.0, 0.5, 2.0], consensus=method == "della",
                               normalize=method == "della")
        for k in base:
            torch.testing.assert_close(got[k], want[k], rtol=4e-6, atol=1e-6)


def test_masks_are_reproducible_whatever_the_key_order_and_batching():
    base, models = _models({"a": (12, 40), "b": (40,), "c": (2, 6, 5)}, n=3, seed=2)
    whole = fusedmerge.della(base, models, density=0.5, epsilon=0.2, seed=5)
    order = ["c", "a", "b"]
    reordered = fusedmerge.della({k: base[k] for k in order}, [{k: m[k] for k in order} for m in models],
                                 density=0.5, epsilon=0.2, seed=5)
    for k in base:
        one = fusedmerge.della(base[k], [m[k] for m in models], density=0.5, epsilon=0.2, seed=5, name=k)
        assert torch.equal(one, whole[k]) and torch.equal(reordered[k], whole[k])
    other = fusedmerge.della(base, models, density=0.5, epsilon=0.2, seed=6)
    assert not torch.equal(other["a"], whole["a"])


def test_fusedmerge_merge_gives_the_same_files_for_any_budget_and_the_in_memory_result(tmp_path):
    from test_merge_cli import SHAPES as LLAMA
    from test_merge_cli import config, merge

    from conftest import load_model_dir as load
    from fusedmerge.synthetic import write_checkpoint

    write_checkpoint(str(tmp_path / "base"), LLAMA, shard_size=60_000)
    for i in range(3):
        write_checkpoint(str(tmp_path / f"m{i}"), LLAMA, i, shard_size=60_000)
    cfg = config(tmp_path, "della", density=0.4, extra="parameters: {lambda: 0.7}\nseed: 5\n")
    assert merge(cfg, tmp_path / "small", "--memory-budget", "40KB", "--shard-size", "50KB") == 0
    assert merge(cfg, tmp_path / "large", "--memory-budget", "1GB", "--shard-size", "50KB") == 0
    small, large = load(tmp_path / "small"), load(tmp_path / "large")
    base, models = load(tmp_path / "base"), [load(tmp_path / f"m{i}") for i in range(3)]
    want = fusedmerge.della(base, models, weights=[1.0, 0.5, 2.0], density=0.4, scaling=0.7, seed=5,
                            out_dtype=torch.bfloat16)
    assert_dicts_equal(small, large)
    assert_dicts_equal({k: small[k] for k in want}, want)


@pytest.mark.parametrize("options, match", [({"density": 0.1, "epsilon": 0.15}, "epsilon"),
                                            ({"density": 0.9, "epsilon": [0.05, 0.2]}, "epsilon"),
                                            ({"density": 0.0}, "density"), ({"density": [0.5, 0.5, 0.5]}, "density"),
                                            ({"consensus": "yes"}, "consensus")])
def test_bad_options_are_refused_by_name(options, match):
    base, models = _models({"w": (4, 4)}, n=2)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedmerge.della(base, models, **options)


def test_mergekit_plugin_runs_della_with_per_model_epsilon():
    from fusedmerge.integrations import mergekit as plugin

    base, models = _models({"w": (16, 32)}, n=2, seed=3)
    sds = {"base": base, "m0": models[0], "m1": models[1]}
    params = {"weight": 1.0, "density": 0.5, "epsilon": {"m0": 0.1, "m1": 0.3}}
    try:
        plugin.install(replace=False, seed=2)
        got = mk_api.merge_state_dicts(sds, "fused_della", parameters=params, base="base")
    finally:
        plugin.uninstall()
    want = fusedmerge.della(base, models, density=0.5, epsilon=[0.1, 0.3], seed=2, out_dtype=torch.float32)
    assert torch.equal(got["w"], want["w"])


def test_configurations_are_checked_when_read():
    from fusedmerge.methods import CONFIG_METHODS

    CONFIG_METHODS["della"].check([{"density": 0.5, "epsilon": 0.2}, {}])
    with pytest.raises(ValueError, match="epsilon"):
        CONFIG_METHODS["della_linear"].check([{"density": 0.5}, {"density": 0.1, "epsilon": 0.2}])
    with pytest.raises(ValueError, match="gamma"):
        CONFIG_METHODS["breadcrumbs"].check([{"gamma": 2.0}])


@pytest.mark.parametrize("options", [{"density": 0.4, "seed": 5},
                                     {"density": [0.3, 1.0, 0.6], "consensus": False, "normalize": False},
                                     {"density": 0.5, "rescale": False, "weights": [1.0, 0.5, 2.0]}], ids=str)
def test_a_tensor_pruned_chunk_by_chunk_has_the_whole_tensors_bits(options, monkeypatch):
    """A 2-D tensor over della.CHUNK elements is pruned and merged in chunks of whole rows of whole Philox groups
    (its drop masks kept from the first pass, the L1 sums exact): the same bits as in one piece, bf16 and fp32."""
    from fusedmerge.methods import della as module

    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(300, 50, generator=g).to(dtype)
        xs = [(base.float() + 0.1 * torch.randn(300, 50, generator=g)).to(dtype) for _ in range(3)]
        monkeypatch.setattr(module, "CHUNK", 1 << 30)
        whole = fusedmerge.della({"w": base}, [{"w": x} for x in xs], name="w", **options)["w"]
        monkeypatch.setattr(module, "CHUNK", 4000)  # pieces of 64 rows (lcm(50, 128) = 3200 elements): 5
        pieces = fusedmerge.della({"w": base}, [{"w": x} for x in xs], name="w", **options)["w"]
        assert torch.equal(pieces, whole) and not torch.equal(whole, base)
