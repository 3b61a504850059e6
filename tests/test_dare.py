"""DARE: masks and results equal on every backend and to the reference, statistics of the masks, and
invariance to key order, batching and backend."""

import math

import pytest
import torch

import fusedmerge
from conftest import CPU_BACKENDS, assert_dicts_equal
from fusedmerge.philox import drop_threshold, keep_mask, mask_key, random_words


def _ones_masks(p, names, n, numel, backend, seed=0):
    """With θ0 = 0, θᵢ = 1 and one model at a time, DARE without rescale returns model i's keep mask."""
    sd = {name: torch.ones(numel) for name in names}
    zero = {name: torch.zeros(numel) for name in names}
    masks = []
    for i in range(n):
        w = [1.0 if j == i else 0.0 for j in range(n)]
        masks.append(fusedmerge.dare(zero, [sd] * n, p, weights=w, rescale=False, seed=seed, backend=backend))
    return masks


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_masks_are_the_philox_masks(backend):
    names = ["a.weight", "b.bias"]
    masks = _ones_masks(0.3, names, 3, 10_007, backend, seed=11)
    for i, m in enumerate(masks):
        for name in names:
            want = keep_mask(mask_key(11, i, name), 10_007, drop_threshold(0.3)).float()
            assert torch.equal(m[name], want), (i, name)


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_low_half_decides_where_the_high_half_ties(backend):
    """Kernels draw the low halves B only where A = T >> 16: thresholds at and just above element k's U
    keep and then drop it, every other element as the reference says."""
    numel = 3000
    u = random_words(mask_key(4, 0, "w"), numel)
    for k in (0, 17, 1234, 2999):
        for t in (int(u[k]), int(u[k]) + 1):
            assert t >> 16 == int(u[k]) >> 16
            (m,) = _ones_masks(t / 2**32, ["w"], 1, numel, backend, seed=4)
            assert torch.equal(m["w"], (u >= t).float()) and m["w"][k] == (t == int(u[k])), (k, t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_backends_equal_reference_on_vit_b32_block(clip_b32_as, backend, dtype):
    base, models = clip_b32_as(dtype)
    # the embeddings but the 2.4M-element patch convolution (the torch reference's Philox takes ~20 s on it;
    # 4-D tensors against the reference: clip_tiny's, below), a 768² projection, the layer norms
    keys = [k for k in base if ("embeddings" in k and "patch" not in k) or "layers.0.self_attn.q" in k
            or "layers.0.layer_norm" in k]
    if backend == "triton":  # the interpreter: 2-D shapes from the position embedding, the 768² weight on the CPU
        keys = [k for k in keys if k != "vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    pick = lambda sd: {k: sd[k] for k in keys}  # noqa: E731
    base, models = pick(base), [pick(m) for m in models]
    for kwargs in (dict(p=0.9, scaling=1 / 8), dict(p=0.5, weights=[1, 2, 3, 4, 5, 6, 7, 8], linear_only=True, seed=3)):
        got = fusedmerge.dare(base, models, backend=backend, **kwargs)
        assert_dicts_equal(got, fusedmerge.dare(base, models, backend="torch", **kwargs))


def test_cpu_backend_on_full_vit_b32_is_reproducible_and_unbiased(clip_b32):
    base, models = clip_b32
    got = fusedmerge.dare(base, models, 0.9, scaling=1 / 8, backend="cpu", seed=5)
    again = fusedmerge.dare(base, models, 0.9, scaling=1 / 8, backend="cpu", seed=5)
    assert_dicts_equal(got, again)
    other = fusedmerge.dare(base, models, 0.9, scaling=1 / 8, backend="cpu", seed=6)
    key = "vision_model.encoder.layers.3.mlp.fc1.weight"
    assert not torch.equal(got[key], other[key])
    # E[DARE] = task arithmetic: the mean delta over a 2.4M-element tensor agrees within a few σ
    ta = fusedmerge.task_arithmetic(base, models, 1 / 8)
    d_dare = (got[key].double() - base[key].double()).mean()
    d_ta = (ta[key].double() - base[key].double()).mean()
    tau = torch.stack([m[key].double() - base[key].double() for m in models])
    sigma = math.sqrt(0.9 / 0.1 * (tau**2).sum().item() / 64) / got[key].numel()
    assert abs(d_dare - d_ta) < 6 * sigma


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_keep_rate_within_binomial_bound(backend):
    n = 400_000
    for p in (0.1, 0.5, 0.9, 0.99):
        (m,) = _ones_masks(p, ["w"], 1, n, backend, seed=2)
        kept = m["w"].sum().item()
        q = 1 - drop_threshold(p) / 2**32
        assert abs(kept - n * q) < 5 * math.sqrt(n * q * (1 - q)), p


def test_masks_are_independent_across_models_tensors_and_neighbours():
    n, p = 1_000_000, 0.5
    masks = _ones_masks(p, ["x", "y"], 2, n, "cpu", seed=9)
    a, b, c = masks[0]["x"].bool(), masks[1]["x"].bool(), masks[0]["y"].bool()
    bound = 5 * math.sqrt(n * 0.25 * 0.75)
    for u, v in ((a, b), (a, c), (a[:-1], a[1:]), (a[:-16], a[16:]), (a[:-32], a[32:]), (a[:-128], a[128:])):
        both = (u & v).sum().item()
        assert abs(both - len(u) * 0.25) < bound


@pytest.mark.parametrize("backend", ["torch"] + CPU_BACKENDS)
def test_same_seed_same_result_whatever_the_order_and_batching(backend, clip_tiny):
    base, models = clip_tiny
    whole = fusedmerge.dare(base, models, 0.7, seed=4, backend=backend)
    reverse = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    shuffled = fusedmerge.dare(reverse(base), [reverse(m) for m in models], 0.7, seed=4, backend=backend)
    for key in base:
        one = fusedmerge.dare(base[key], [m[key] for m in models], 0.7, seed=4, name=key, backend=backend)
        assert torch.equal(one, whole[key]) and torch.equal(shuffled[key], whole[key]), key
    assert_dicts_equal(whole, fusedmerge.dare(base, models, 0.7, seed=4, backend="torch"))


def test_p_zero_is_task_arithmetic_and_rescale_off_keeps_values(clip_tiny):
    base, models = clip_tiny
    assert_dicts_equal(fusedmerge.dare(base, models, 0.0, scaling=0.3), fusedmerge.task_arithmetic(base, models, 0.3))
    got = fusedmerge.dare(base, models, 0.5, rescale=False, weights=[1, 0, 0, 0])
    for key in base:
        kept = got[key] != base[key]
        assert torch.equal(got[key][kept], models[0][key][kept]), key


def test_linear_only_drops_only_2d_weights(clip_tiny):
    base, models = clip_tiny
    got = fusedmerge.dare(base, models, 0.9, linear_only=True, scaling=0.25)
    ta = fusedmerge.task_arithmetic(base, models, 0.25)
    for key in base:
        assert torch.equal(got[key], ta[key]) == (base[key].dim() != 2), key


@pytest.mark.parametrize("p, error, match", [(1.0, ValueError, "p = 1 would drop"), (-0.1, ValueError, r"\[0, 1\)"),
                                             (math.nan, ValueError, "finite"), ("x", TypeError, "p must be")])
def test_bad_drop_probability(p, error, match):
    with pytest.raises(error, match=match):
        fusedmerge.dare(torch.zeros(3), [torch.ones(3)], p)


def test_bad_options():
    with pytest.raises(TypeError, match="rescale"):
        fusedmerge.dare(torch.zeros(3), [torch.ones(3)], 0.5, rescale="l2")
    with pytest.raises(TypeError, match="seed"):
        fusedmerge.dare(torch.zeros(3), [torch.ones(3)], 0.5, seed="a")
    with pytest.raises(ValueError, match="weights has 1 entries but there are 2"):
        fusedmerge.dare(torch.zeros(3), [torch.ones(3)] * 2, 0.5, weights=[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_l1_rescale_equals_reference(clip_tiny, backend):
    base, models = clip_tiny
    for kwargs in (dict(p=0.7), dict(p=0.3, weights=[1, 2, 0.5, 1], linear_only=True, seed=8)):
        got = fusedmerge.dare(base, models, rescale="l1", backend=backend, **kwargs)
        assert_dicts_equal(got, fusedmerge.dare(base, models, rescale="l1", backend="torch", **kwargs))


def test_l1_norms_are_exact_sums():
    from fusedmerge import dispatch
    from fusedmerge.reference import CombineJob, bucket_value, l1_buckets_reference

    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(5000, generator=g) * 10.0 ** e for e in range(-30, 30, 3)])
    job = CombineJob(torch.empty_like(x), [x, -x * 3], [1.0, 1.0], torch.zeros_like(x), drop_threshold(0.5),
                     [mask_key(0, 0, "x"), mask_key(0, 1, "x")])
    want = math.fsum(abs(v) for v in x.tolist())
    buckets = l1_buckets_reference(job)
    assert bucket_value(buckets[0, 0]) == want
    kept = keep_mask(job.keys[0], x.numel(), job.threshold)
    assert bucket_value(buckets[0, 1]) == math.fsum(abs(v) for v in x[kept].tolist())
    assert torch.equal(dispatch.run("l1_buckets", [job], "cpu")[0], buckets)


def test_l1_rescale_keeps_each_task_vectors_l1_norm(clip_tiny):
    base, models = clip_tiny
    got = fusedmerge.dare(base, models[:1], 0.8, rescale="l1")
    for key in base:
        tau = (models[0][key].double() - base[key].double()).abs().sum()
        if tau < 1e-7:
            continue
        kept = (got[key].double() - base[key].double()).abs().sum()
        assert abs(kept / tau - 1) < 1e-5, key
    zero = fusedmerge.dare(torch.zeros(10), [torch.zeros(10)], 0.5, rescale="l1")
    assert torch.equal(zero, torch.zeros(10))
