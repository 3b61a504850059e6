"""OPCM: the batched projection against per-matrix full SVDs, the ContinualMerger against FusionBench's loop
(opcm_reference), the closed form, degenerate matrices, and refused input that leaves the state unchanged.

Tolerances: in fp64 the fused path equals the full-SVD reference to ~1e-12 relative (asserted at 1e-8).
In fp32 both it and the fp32 reference differ from the fp64 truth by the fp32 noise of the problem (singular
vectors of small σ, output rounding); the fused path must be at least as accurate as the reference (within
2×), and within 1e-4 of it relative to the merged task vector's norm.
"""

import math

import pytest
import torch

from conftest import CPU_BACKENDS, requires_gpu, same_bits, tiny_clip_modules
from fusedmerge.opcm import (
    ContinualMerger,
    factor,
    linear_weights,
    looks_linear,
    opcm_reference,
    project,
    project_reference,
    split_rank,
)
from fusedmerge.opcm.merger import nonleaf_params
from fusedmerge.synthetic import clip_vit_models


def clip_like(m, n, seed, rank=4):
    """A task-vector-like matrix: low rank plus dense noise (fp64)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g, dtype=torch.float64)
    return low * 5e-3 / rank**0.5 + torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


SHAPES = [(48, 48), (96, 48), (48, 96), (768, 768)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", ["fusionbench", "paper"])
@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9, 1.0])
def test_projection_equals_full_svd_in_fp64(shape, variant, alpha):
    D, tau = clip_like(*shape, 1), clip_like(*shape, 2)
    want = project_reference(D, tau, alpha, variant)
    assert rel(project(D, tau, alpha, variant=variant), want) < 1e-8


@pytest.mark.parametrize("shape", [(768, 768), (3072, 768), (768, 3072)], ids=str)
@pytest.mark.parametrize("variant", ["fusionbench", "paper"])
def test_projection_fp32_at_least_as_accurate_as_fp32_reference(shape, variant):
    D, tau = clip_like(*shape, 3).float(), clip_like(*shape, 4).float()
    truth = project_reference(D.double(), tau.double(), 0.5, variant)
    reference_error = rel(project_reference(D, tau, 0.5, variant), truth)
    got = project(D, tau, 0.5, variant=variant)
    assert got.dtype == torch.float32 and got.shape == tau.shape
    assert rel(got, truth) <= 2 * reference_error + 1e-6


def test_batched_list_of_mixed_shapes_equals_one_by_one():
    pairs = [(clip_like(m, n, 10 + i), clip_like(m, n, 20 + i)) for i, (m, n) in
             enumerate([(40, 24), (24, 40), (40, 24), (16, 16), (24, 40)])]
    together = project([d for d, _ in pairs], [t for _, t in pairs], 0.4)
    for (d, t), got in zip(pairs, together):
        assert rel(got, project(d, t, 0.4)) < 1e-12
    stacked = project(torch.stack([pairs[0][0], pairs[2][0]]), torch.stack([pairs[0][1], pairs[2][1]]), 0.4)
    assert rel(stacked[1], together[2]) < 1e-12


def test_projection_is_scale_invariant_in_the_merged_vector():
    D, tau = clip_like(64, 32, 5), clip_like(64, 32, 6)
    assert rel(project(D * 37.5, tau, 0.5), project(D, tau, 0.5)) < 1e-12


def test_split_rank_is_the_first_index_past_alpha():
    s = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert split_rank(s, 0.5).tolist() == [1, 1, 0]   # [.5, .83, 1]: strictly greater than alpha
    assert split_rank(s, 0.2).tolist() == [0, 0, 0]
    assert split_rank(s, 1.0).tolist() == [0, 0, 0]   # never strictly above 1: no block


def test_zero_merged_vector_leaves_the_task_vector_unchanged():
    tau = clip_like(40, 24, 7)
    got = project(torch.zeros_like(tau), tau, 0.5)
    assert torch.equal(got, tau)


def test_rank_deficient_matches_the_reference_outside_the_null_space():
    """D of rank 3: the reference's singular vectors of σ = 0 are arbitrary, so only the part of the
    result outside (left null space) × (right null space) is defined; it must match."""
    g = torch.Generator().manual_seed(8)
    D = torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 24, generator=g, dtype=torch.float64)
    tau = clip_like(40, 24, 9)
    got, want = project(D, tau, 0.5), project_reference(D, tau, 0.5)
    assert torch.isfinite(got).all()
    U, s, V = torch.linalg.svd(D)
    Pn, Qn = U[:, 3:] @ U[:, 3:].T, V[3:].T @ V[3:]
    defined = lambda x: x - Pn @ x @ Qn  # noqa: E731
    assert rel(defined(got), defined(want)) < 1e-9
    # the block of the three live directions is removed exactly as the reference removes it
    Ur, Vr = U[:, :3], V[:3].T
    assert torch.allclose(Ur.T @ got @ Vr, Ur.T @ want @ Vr, atol=1e-12)


def test_repeated_singular_values_give_no_nan_and_the_basis_free_block():
    """σ = (2 ×10, 1 ×14): any basis of each cluster is a valid SVD. The 'paper' block removal with k at the
    cluster boundary does not depend on the basis and must match; the diagonal variant must stay finite."""
    g = torch.Generator().manual_seed(10)
    Q1, _ = torch.linalg.qr(torch.randn(40, 24, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    D = Q1 @ torch.diag(torch.tensor([2.0] * 10 + [1.0] * 14, dtype=torch.float64)) @ Q2.T
    tau = clip_like(40, 24, 11)
    U, s, V = factor(D[None])
    assert torch.allclose(U[0].T @ U[0], torch.eye(24, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(U[0] * s[0] @ V[0].T, D, atol=1e-10)
    assert split_rank(s, 0.6).item() == 10
    assert rel(project(D, tau, 0.6, variant="paper"), project_reference(D, tau, 0.6, "paper")) < 1e-9
    got = project(D, tau, 0.6)
    assert torch.isfinite(got).all()
    # in the solver's own basis, exactly the diagonal and the 10×10 block of Uᵀ τ V are gone
    idx = torch.arange(24)
    removed = (idx[:, None] == idx[None]) | ((idx[:, None] < 10) & (idx[None] < 10))
    P = U[0].T @ tau @ V[0]
    assert torch.allclose(U[0].T @ got @ V[0], torch.where(removed, 0.0, P).double(), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# ContinualMerger against FusionBench's loop
# ---------------------------------------------------------------------------------------------------------


def as64(sd):
    return {k: v.double() for k, v in sd.items()}


def task_vector_norm(merged, base):
    return math.sqrt(sum(float((merged[k].double() - base[k].double()).norm()) ** 2 for k in base))


def run_both(base, models, **options):
    """(fused merged, reference merged) after each model."""
    skip = options.get("skip_nonleaf", False)
    frozen = set(nonleaf_params(list(base))) if skip else set()
    ref = opcm_reference(base, models, options.get("alpha", 0.5), variant=options.get("variant", "fusionbench"),
                         projectable=lambda k: looks_linear(k, base[k]), frozen=lambda k: k in frozen)
    merger = ContinualMerger(base, options.pop("alpha", 0.5), **options)
    for model, want in zip(models, ref):
        yield merger.add(model).merged(), want, merger


@pytest.mark.parametrize("variant", ["fusionbench", "paper"])
@pytest.mark.parametrize("skip_nonleaf", [False, True])
@pytest.mark.parametrize("order", [(0, 1, 2, 3, 4), (3, 0, 4, 2, 1)], ids=["order0", "shuffled"])
def test_merger_equals_reference_in_fp64_over_five_steps(variant, skip_nonleaf, order):
    base, models = clip_vit_models("tiny", 5, seed=3)
    base, models = as64(base), [as64(models[i]) for i in order]
    steps = 0
    for got, want, merger in run_both(base, models, variant=variant, skip_nonleaf=skip_nonleaf):
        delta = task_vector_norm(want, base)
        assert task_vector_norm({k: got[k] - want[k] + base[k] for k in base}, base) < 1e-8 * delta
        # the closed form: the merged task vector's norm is the mean of the task-vector norms
        norms = merger.task_vector_norms
        assert task_vector_norm(got, base) == pytest.approx(sum(norms) / len(norms), rel=1e-10)
        steps += 1
    assert steps == 5


def test_skip_nonleaf_keeps_the_first_task_vector_direction():
    base, models = clip_vit_models("tiny", 3, seed=4)
    key = "vision_model.embeddings.class_embedding"
    quirk = ContinualMerger(base, skip_nonleaf=True)
    plain = ContinualMerger(base)
    for m in models:
        quirk.add(m), plain.add(m)
    first = models[0][key] - base[key]
    got = quirk.merged()[key] - base[key]
    assert torch.allclose(got / got.norm(), first / first.norm(), atol=1e-5)
    moved = plain.merged()[key] - base[key]
    assert not torch.allclose(moved / moved.norm(), first / first.norm(), atol=1e-3)


def test_nonleaf_entries_from_state_dict_names_include_the_root_module():
    keys = ["logit_scale", "vision.embeddings.class_embedding", "vision.embeddings.patch.weight",
            "vision.post_layernorm.weight"]
    assert nonleaf_params(keys) == ["logit_scale", "vision.embeddings.class_embedding"]
    assert nonleaf_params(["weight", "bias"]) == []   # a lone Linear: its root is a leaf


@pytest.mark.parametrize("variant", ["fusionbench", "paper"])
def test_merger_fp32_on_tiny_is_as_accurate_as_the_fp32_reference(variant):
    base, models = clip_vit_models("tiny", 4, seed=5)
    truth = list(opcm_reference(as64(base), map(as64, models), 0.5, variant=variant,
                                projectable=lambda k: looks_linear(k, base[k])))
    for i, (got, want, _) in enumerate(run_both(base, models, variant=variant)):
        delta = task_vector_norm(truth[i], base)
        err = lambda sd: task_vector_norm({k: sd[k].double() - truth[i][k] + base[k] for k in base}, base)  # noqa: E731
        assert got[next(iter(base))].dtype == torch.float32
        assert err(got) <= 2 * err(want) + 1e-6 * delta
        assert task_vector_norm({k: got[k].double() - want[k] + base[k] for k in base}, base) < 1e-4 * delta


def test_merger_on_vit_b32_shapes_two_steps(clip_b32):
    """Two ViT-B/32 blocks (768², 3072×768, 768×3072 matrices) with the embeddings, fp32, two steps."""
    full_base, full_models = clip_b32
    keep = [k for k in full_base if "layers." not in k or ".layers.0." in k or ".layers.1." in k]
    base = {k: full_base[k] for k in keep}
    models = [{k: m[k] for k in keep} for m in full_models[:2]]
    results = list(run_both(base, models))
    assert len(results) == 2
    got, want, merger = results[-1]
    delta = task_vector_norm(want, base)
    assert task_vector_norm({k: got[k] - want[k] + base[k] for k in base}, base) < 1e-4 * delta
    assert task_vector_norm(got, base) == pytest.approx(sum(merger.task_vector_norms) / 2, rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_backends_give_the_same_bits(backend):
    base, models = clip_vit_models("tiny", 3, seed=6)
    outs = []
    for name in ("torch", backend):
        merger = ContinualMerger(base, 0.3, backend=name)
        for m in models:
            merger.add(m)
        outs.append(merger.merged())
    for k in base:
        assert same_bits(outs[0][k], outs[1][k]), k


def test_bf16_models_keep_their_dtype_and_follow_the_fp32_merge():
    base, models = clip_vit_models("tiny", 3, seed=7, dtype=torch.bfloat16)
    as32 = lambda sd: {k: v.float() for k, v in sd.items()}  # noqa: E731
    got = ContinualMerger(base)
    want = ContinualMerger(as32(base))
    for m in models:
        got.add(m), want.add(as32(m))
    g, w = got.merged(), want.merged()
    for k in base:
        assert g[k].dtype == torch.bfloat16
        assert torch.equal(g[k], w[k].to(torch.bfloat16)), k
    assert want.merged(out_dtype=torch.bfloat16)[k].dtype == torch.bfloat16


def test_modules_in_module_out_with_linear_layers_from_the_tree():
    base, models = tiny_clip_modules(3)
    transformers = pytest.importorskip("transformers")
    names = linear_weights(base)
    assert len(names) == 12 and not any("embed" in n for n in names)
    merger = ContinualMerger(base)
    as_dict = ContinualMerger(base.state_dict(), projectable=names)
    for m in models:
        merger.add(m), as_dict.add(m.state_dict())
    merged = merger.merged()
    assert isinstance(merged, transformers.CLIPVisionModel) and merged is not base
    for k, v in as_dict.merged().items():
        assert torch.equal(merged.state_dict()[k], v), k
    # the state-dict guess picks the same matrices on CLIP
    assert [k for k, v in base.state_dict().items() if looks_linear(k, v)] == names


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan"), "x"])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
    base, _ = clip_vit_models("tiny", 1)
    with pytest.raises((ValueError, TypeError), match="alpha"):
        ContinualMerger(base, alpha)
    with pytest.raises((ValueError, TypeError), match="alpha"):
        project(torch.ones(3, 2), torch.ones(3, 2), alpha)


def test_bad_options_are_refused():
    base, _ = clip_vit_models("tiny", 1)
    with pytest.raises(ValueError, match="variant"):
        ContinualMerger(base, variant="ties")
    with pytest.raises(ValueError, match="no projectable"):
        ContinualMerger({k: v for k, v in base.items() if v.dim() != 2})
    with pytest.raises(ValueError, match="not floating entries"):
        ContinualMerger(base, projectable=["nope.weight"])
    with pytest.raises(ValueError, match="not 2-D"):
        ContinualMerger(base, projectable=lambda k, t: t.dim() == 1)
    with pytest.raises(RuntimeError, match="add"):
        ContinualMerger(base).merged()
    with pytest.raises(TypeError, match="state dict"):
        ContinualMerger([1, 2])
    with pytest.raises(ValueError, match="one shape"):
        project([torch.ones(3, 2)], [torch.ones(2, 3)])


def _snapshot(merger):
    return merger.steps, merger.task_vector_norms, {k: v.clone() for k, v in merger.merged().items()}


def _mutations(model):
    key = "vision_model.pre_layrnorm.weight"
    w = "vision_model.encoder.layers.0.mlp.fc1.weight"
    yield "missing", {k: v for k, v in model.items() if k != key}, ValueError
    yield "unexpected", {**model, "extra.weight": torch.ones(2)}, ValueError
    yield "shape", {**model, w: model[w][:, :-1]}, ValueError
    yield "float64", {**model, w: model[w].double()}, TypeError
    yield "device", {**model, w: torch.empty(model[w].shape, device="meta")}, ValueError
    yield "integer buffer", {**model, "buf": torch.tensor([2])}, ValueError
    yield "not a model", [model], TypeError


def test_refused_models_leave_the_state_unchanged():
    base, models = clip_vit_models("tiny", 3, seed=8)
    base = {**base, "buf": torch.tensor([1])}
    models = [{**m, "buf": torch.tensor([1])} for m in models]
    merger = ContinualMerger(base)
    merger.add(models[0]).add(models[1])
    before = _snapshot(merger)
    for label, bad, error in _mutations(models[2]):
        with pytest.raises(error):
            merger.add(bad)
        steps, norms, merged = _snapshot(merger)
        assert (steps, norms) == before[:2], label
        assert all(torch.equal(merged[k], before[2][k]) for k in merged), label
    assert merger.add(models[2]).steps == 3


@requires_gpu
def test_merger_on_gpu_matches_cpu():
    base, models = clip_vit_models("tiny", 4, seed=9)
    cuda = lambda sd: {k: v.cuda() for k, v in sd.items()}  # noqa: E731
    cpu, gpu = ContinualMerger(base), ContinualMerger(cuda(base))
    for m in models:
        cpu.add(m), gpu.add(cuda(m))
    want, got = cpu.merged(), gpu.merged()
    delta = task_vector_norm(want, base)
    assert task_vector_norm({k: got[k].cpu() - want[k] + base[k] for k in base}, base) < 1e-4 * delta
