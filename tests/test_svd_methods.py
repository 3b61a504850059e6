"""TSV-M, Iso-C, Iso-CTS, WUDI and MagMax against FusionBench 0.2.33's own functions on the same task vectors
(small CLIP-ViT-like shapes, fp32): CLIP-like task vectors (low rank plus noise), rank-deficient, zero and
repeated-singular-value matrices; the stated tolerances (README); the references equal FusionBench's
functions; no NaN; bad input refused by name; the FusionBench classes through `_target_`; `fusedmerge merge`."""

import copy
import logging

import pytest
import torch

import fusedmerge
from conftest import load_model_dir, tiny_clip_modules
from fusedmerge import cli
from fusedmerge.methods import svd_reference as R

fb = pytest.importorskip("fusion_bench")
from fusion_bench.method.isotropic_merging import iso_utils  # noqa: E402
from fusion_bench.method.magmax.magmax import _magmax_select  # noqa: E402
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction  # noqa: E402
from fusion_bench.method.wudi.wudi import wudi_merging  # noqa: E402

logging.getLogger("fusion_bench").setLevel(logging.ERROR)

TOL = {"tsv_m": 5e-4, "iso_c": 2e-5, "iso_cts": 5e-4}  # ‖Δ − Δ_FB‖_F / ‖Δ_FB‖_F per matrix, fp32 (README)
WUDI_TOL = 1e-3  # ‖X − X_FB‖_F / ‖X_FB − X₀‖_F per matrix: relative to how far Adam moved X
SHAPES = {"embeddings.class_embedding": (32,), "embeddings.patch_embedding.weight": (32, 3, 4, 4),
          "embeddings.position_embedding.weight": (17, 32), "encoder.layers.0.self_attn.q_proj.weight": (32, 32),
          "encoder.layers.0.self_attn.q_proj.bias": (32,), "encoder.layers.0.self_attn.out_proj.weight": (32, 32),
          "encoder.layers.0.mlp.fc1.weight": (128, 32), "encoder.layers.0.mlp.fc1.bias": (128,),
          "encoder.layers.0.mlp.fc2.weight": (32, 128), "encoder.layers.0.layer_norm1.weight": (32,)}


def _clip_like(shape, t, g, rank=4):
    """Task vectors as fine-tuned CLIP's: a few strong directions plus noise, ~1e-3 entries."""
    if len(shape) != 2:
        return [1e-3 * torch.randn(shape, generator=g) for _ in range(t)]
    m, n = shape
    return [1e-3 * (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) + 0.3 * torch.randn(m, n, generator=g))
            for _ in range(t)]


def _pool(t=4, make=_clip_like, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {k: (0.02 * torch.randn(s, generator=g)).to(dtype) for k, s in SHAPES.items()}
    tvs = {k: make(s, t, g) for k, s in SHAPES.items()}
    return base, [{k: base[k] + tvs[k][i].to(dtype) for k in base} for i in range(t)]


def _tvs(base, models):
    return [{k: m[k] - base[k] for k in base} for m in models]


def _fb(name, base, models, **kw):
    """FusionBench's function on the task vectors, then θ0 + λ·Δ as its algorithm class does."""
    tvs, scale = _tvs(base, models), kw.pop("scaling", 1.0)
    if name == "tsv_m":
        delta = compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu", **kw)
    elif name == "iso_c":
        delta = iso_utils.iso_c(tvs, accelerator="cpu", **kw)
    elif name == "iso_cts":
        delta = iso_utils.iso_cts(tvs, kw.pop("common_space_fraction", 0.8), accelerator="cpu", **kw)
    elif name == "wudi":
        delta = wudi_merging(tvs, accelerator="cpu", **kw)
    else:
        delta = _magmax_select(tvs)
    return {k: base[k] + scale * delta[k].detach() for k in base}


def _fused(name, base, models, **kw):
    return getattr(fusedmerge, name)(base, models, **kw)


def _errors(got, want, base):
    return {k: float((got[k] - want[k]).norm() / (want[k] - base[k]).norm().clamp_min(1e-30)) for k in want}


def _assert_within(name, got, want, base, tol=None):
    assert all(torch.isfinite(v).all() for v in got.values()), name
    errors = _errors(got, want, base)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= (tol or TOL[name]), (name, worst, errors[worst])


@pytest.mark.parametrize("name, kw", [("tsv_m", {}), ("iso_c", {"scaling": 0.7}),
                                      ("iso_cts", {"common_space_fraction": 0.5, "scaling": 1.3})])
def test_clip_like_task_vectors_match_fusion_bench(name, kw):
    base, models = _pool(t=4)
    _assert_within(name, _fused(name, base, models, **kw), _fb(name, base, models, **kw), base)


def test_eight_tasks_with_per_task_alpha_match_fusion_bench():
    base, models = _pool(t=8, seed=1)
    alpha = [0.5, 1.0, 1.5, 2.0, 0.25, 1.0, 0.75, 1.25]
    scaled = [{k: base[k] + a * (m[k] - base[k]) for k in base} for m, a in zip(models, alpha)]
    got = fusedmerge.tsv_m(base, models, alpha)
    _assert_within("tsv_m", got, _fb("tsv_m", base, scaled), base)


def test_in_fp64_the_batched_factorisation_equals_fusion_bench_to_1e_9():
    """The algorithms are the same: the fp32 differences above are rounding."""
    base, models = _pool(t=4, seed=2, dtype=torch.float64)
    for name in ("tsv_m", "iso_c", "iso_cts"):
        _assert_within(name, _fused(name, base, models), _fb(name, base, models), base, tol=1e-9)


def test_tsv_m_on_a_b32_attention_matrix_with_8_tasks_matches_fusion_bench():
    """768×768, 8 tasks: the concatenated singular vectors are square with condition numbers ~10⁴, where a
    rank rule in ε₃₂ drops a live direction (2.9e-2 off FusionBench before it was ε₆₄-based)."""
    g = torch.Generator().manual_seed(0)  # fusedmerge.synthetic.clip_vit_finetuned's task vectors
    taus = [1e-3 * torch.randn(768, 768, generator=g)
            + torch.randn(768, 4, generator=g) @ torch.randn(4, 768, generator=g) * 2.5e-3 for _ in range(8)]
    got = fusedmerge.tsv_m(torch.zeros(768, 768), taus)
    want = compute_and_sum_svd_mem_reduction([{"w": t} for t in taus], accelerator="cpu")["w"]
    assert torch.isfinite(got).all()
    assert (got - want).norm() <= TOL["tsv_m"] * want.norm()


def test_polar_factors_keep_every_direction_the_fp64_gram_resolves():
    """σ from 1 down to 3e-6: below 64·ε₃₂ (the old rank rule dropped it), above √(64·ε₆₄)."""
    from fusedmerge.methods._svd import inv_sqrt, polar_with_frame

    g = torch.Generator().manual_seed(13)
    orth = lambda a, b: torch.linalg.qr(torch.randn(a, b, generator=g, dtype=torch.float64))[0]  # noqa: E731
    Q, W = orth(96, 64), orth(64, 64)
    A = (Q * torch.logspace(0, -5.5, 64, dtype=torch.float64)) @ W.T
    assert (A @ inv_sqrt(A) - Q @ W.T).norm() < 1e-3
    F = orth(96, 20)  # an orthonormal block beside A: the low-rank update equals the full polar factor
    full = torch.cat([A, F], -1)
    want = full @ inv_sqrt(full)
    assert (torch.cat(polar_with_frame(A, F), -1) - want).norm() < 1e-3


def _rank_deficient(shape, t, g):
    """Each task matrix of rank k/2 (singular), no noise."""
    if len(shape) != 2:
        return [1e-3 * torch.randn(shape, generator=g) for _ in range(t)]
    m, n = shape
    r = min(m, n) // 2
    return [1e-3 * torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) for _ in range(t)]


def _repeated(shape, t, g):
    """Task matrices Q diag(σ) Pᵀ with σ in clusters of equal values (4, 2, 1), cut where TSV-M cuts."""
    if len(shape) != 2:
        return [1e-3 * torch.randn(shape, generator=g) for _ in range(t)]
    m, n = shape
    k = min(m, n)
    r = k // t
    s = torch.tensor([4.0] * r + [2.0] * r + [1.0] * (k - 2 * r))
    orth = lambda a: torch.linalg.qr(torch.randn(a, k, generator=g, dtype=torch.float64))[0]  # noqa: E731
    return [(1e-3 * orth(m) @ torch.diag(s.double()) @ orth(n).T).float() for _ in range(t)]


@pytest.mark.parametrize("make", [_rank_deficient, _repeated], ids=["rank_deficient", "repeated"])
def test_singular_and_repeated_spectra_match_fusion_bench(make):
    base, models = _pool(t=4, make=make, seed=3)
    for name in ("tsv_m", "iso_c", "iso_cts"):
        _assert_within(name, _fused(name, base, models), _fb(name, base, models), base)


def test_iso_c_of_a_rank_deficient_sum_matches_fusion_bench_on_its_range_and_is_zero_elsewhere():
    """FusionBench fills the null space of Σ τᵢ with LAPACK's arbitrary completion (times mean σ); fusedmerge
    leaves it out. They agree on the sum's row and column spaces."""
    g = torch.Generator().manual_seed(4)
    base = torch.zeros(48, 16)
    taus = [1e-3 * torch.randn(48, 1, generator=g) @ torch.randn(1, 16, generator=g) for _ in range(3)]
    got = fusedmerge.iso_c(base, [base + t for t in taus])
    want = iso_utils.iso_c([{"w": t} for t in taus], accelerator="cpu")["w"]
    u, s, vh = torch.linalg.svd(sum(taus).double())
    pu, pv = u[:, :3] @ u[:, :3].T, vh[:3].T @ vh[:3]
    assert torch.allclose((pu @ got.double() @ pv).float(), (pu @ want.double() @ pv).float(), rtol=0, atol=1e-4 * s[0])
    assert torch.allclose(got.double(), pu @ got.double() @ pv, rtol=0, atol=1e-6 * s[0])


def test_zero_task_vectors_give_the_base_without_nan():
    base, models = _pool(t=3, seed=5)
    key = "encoder.layers.0.mlp.fc1.weight"
    for m in models:
        m[key] = base[key].clone()
    models[1]["encoder.layers.0.mlp.fc2.weight"] = base["encoder.layers.0.mlp.fc2.weight"].clone()
    for name in ("tsv_m", "iso_c", "iso_cts", "wudi", "magmax"):
        got = _fused(name, base, models, **({"iter_num": 3} if name == "wudi" else {}))
        assert all(torch.isfinite(v).all() for v in got.values()), name
        assert torch.equal(got[key], base[key]), name
    for name in ("tsv_m", "iso_c", "iso_cts"):
        want = _fb(name, base, models)
        assert torch.equal(want[key], base[key])


def test_one_model_reconstructs_its_task_vector():
    """T = 1 is allowed as in FusionBench: TSV-M keeps every triplet (τ itself), Iso-C its polar factor."""
    base, models = _pool(t=1, seed=6)
    got = fusedmerge.tsv_m(base, models)
    assert max(_errors(got, models[0], base).values()) < 1e-4
    _assert_within("iso_c", _fused("iso_c", base, models), _fb("iso_c", base, models), base)


def test_wudi_matches_fusion_bench_after_the_same_iterations():
    base, models = _pool(t=3, seed=7)
    start = {k: base[k] + sum(m[k] - base[k] for m in models) for k in base}
    got = fusedmerge.wudi(base, models, 10)
    want = _fb("wudi", base, models, iter_num=10)
    for k, b in base.items():
        if b.dim() == 2:
            moved = (want[k] - start[k]).norm()
            assert moved > 1e-5 * start[k].norm(), k  # Adam moved X
            assert (got[k] - want[k]).norm() <= WUDI_TOL * moved, k
        else:
            assert torch.allclose(got[k], want[k], rtol=0, atol=1e-7), k


def test_magmax_equals_fusion_bench_exactly_with_ties():
    base, models = _pool(t=4, seed=8)
    key = "encoder.layers.0.mlp.fc1.bias"
    models[2][key] = 2 * base[key] - models[1][key]  # |τ₂| = |τ₁|, opposite sign: the later one wins
    for scaling in (0.5, 1.0, 0.3):
        got = fusedmerge.magmax(base, models, scaling)
        want = _fb("magmax", base, models, scaling=scaling)
        assert all(torch.equal(got[k], want[k]) for k in base), scaling


def test_references_are_fusion_bench_functions():
    base, models = _pool(t=3, seed=9)
    pairs = [("tsv_m", R.tsv_m_reference, {}), ("iso_c", R.iso_c_reference, {"scaling": 0.5}),
             ("iso_cts", R.iso_cts_reference, {}), ("magmax", R.magmax_reference, {"scaling": 0.5}),
             ("wudi", R.wudi_reference, {"iter_num": 2})]
    for name, ref, kw in pairs:
        want = _fb(name, base, models, **kw)
        got = ref(base, models, **kw)
        tol = 1e-6 if name == "wudi" else 0  # autograd's graph differs from FusionBench's by operation order
        assert all(torch.allclose(got[k], want[k], rtol=0, atol=tol) for k in base), name


def test_bad_input_is_refused_by_name():
    base, models = _pool(t=3, seed=10)
    with pytest.raises(ValueError, match="matrices"):
        fusedmerge.iso_c(torch.zeros(5), [torch.ones(5), torch.ones(5)])
    odd = copy.deepcopy(models)
    odd[1]["encoder.layers.0.mlp.fc1.weight"] = torch.zeros(32, 128)
    for name in ("tsv_m", "iso_c", "iso_cts", "wudi", "magmax"):
        with pytest.raises(ValueError, match="encoder.layers.0.mlp.fc1.weight"):
            _fused(name, base, odd)
    with pytest.raises(ValueError, match="exclude_keys"):
        fusedmerge.tsv_m(base, models, exclude_keys=["nope"])
    with pytest.raises(TypeError, match="exclude_keys"):
        fusedmerge.iso_c(base, models, exclude_keys="encoder.layers.0.mlp.fc1.weight")
    with pytest.raises(ValueError, match="alpha"):
        fusedmerge.tsv_m(base, models, [1.0, 2.0])
    with pytest.raises(ValueError, match="common_space_fraction"):
        fusedmerge.iso_cts(torch.zeros(6, 6), [torch.ones(6, 6)] * 4, common_space_fraction=0.0)
    with pytest.raises(ValueError, match="iter_num"):
        fusedmerge.wudi(base, models, -1)


def test_excluded_keys_get_the_mean_task_vector():
    base, models = _pool(t=3, seed=11)
    key = "encoder.layers.0.self_attn.out_proj.weight"
    for name in ("tsv_m", "iso_c", "iso_cts"):
        got = _fused(name, base, models, exclude_keys=[key])
        want = _fb(name, base, models, exclude_keys=[key])
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-7), name


FB_CLASSES = [  # ours, FusionBench's (None: compared with the Python function instead), arguments
    ("FusedTaskSingularVectorMerging", "TaskSingularVectorMerging", {"alpha": 0.8}),
    ("FusedIsoC", None, {"scaling_factor": 0.9}),
    ("FusedIsoCTS", "IsotropicMergingInCommonAndTaskSubspace", {"scaling_factor": 1.1, "common_space_fraction": 0.8}),
    ("FusedWUDIMerging", None, {"iter_num": 3}),
    ("FusedMagMax", "MagMaxAlgorithm", {"scaling_factor": 0.5, "inplace": False}),
]
FUNCTIONS = {"FusedIsoC": lambda b, ms: fusedmerge.iso_c(b, ms, 0.9), "FusedWUDIMerging": lambda b, ms: fusedmerge.wudi(b, ms, 3)}


def test_fusion_bench_classes_through_target_match_fusion_bench_on_a_clip_pool():
    from fusion_bench.utils import instantiate

    base, models = tiny_clip_modules(3)
    pool = lambda: {"_pretrained_": copy.deepcopy(base), **{f"t{i}": copy.deepcopy(m) for i, m in enumerate(models)}}  # noqa: E731
    base_sd = base.state_dict()
    for ours, theirs, kw in FB_CLASSES:
        algorithm = instantiate({"_target_": f"fusedmerge.integrations.fusion_bench.{ours}", **kw})
        assert isinstance(algorithm, fb.BaseAlgorithm)
        got = algorithm.run(fb.BaseModelPool(pool())).state_dict()
        if theirs is None:
            want = FUNCTIONS[ours](base_sd, [m.state_dict() for m in models])
        else:
            want = instantiate({"_target_": f"fusion_bench.method.{theirs}", **kw}).run(fb.BaseModelPool(pool())).state_dict()
        assert list(got) == list(want)
        for k in want:
            err = (got[k].float() - want[k].float()).norm()
            scale = (want[k] - base_sd[k]).float().norm()
            assert err <= (0 if theirs in (None, "MagMaxAlgorithm") else 5e-4) * scale + 1e-7, (ours, k)


def test_merge_cli_runs_a_config_method(small_llama_ckpts, tmp_path):
    ckpts = small_llama_ckpts
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: iso_cts\nbase_model: {ckpts / 'base'}\nmodels:\n"
                   + "".join(f"  - model: {ckpts / f'm{i}'}\n" for i in range(3))
                   + "parameters: {scaling_factor: 0.9, common_space_fraction: 0.5}\n")
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    got, base = load_model_dir(tmp_path / "out"), load_model_dir(ckpts / "base")
    models = [load_model_dir(ckpts / f"m{i}") for i in range(3)]
    want = fusedmerge.iso_cts(base, models, 0.9, common_space_fraction=0.5)
    assert list(got) == list(want)
    for k in want:
        assert torch.allclose(got[k].float(), want[k].float(), rtol=1e-2, atol=1e-6), k
