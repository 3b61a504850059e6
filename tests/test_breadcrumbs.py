"""Breadcrumbs / breadcrumbs_ties against mergekit 0.1.5's own merge_tensors: equal up to fp32 rounding
(no magnitudes tie at a threshold in random fp32 data), bf16 within a stated bound, mergekit's edge cases
of magnitude_outliers, and refusals by name."""

import pytest
import torch
from test_della import SHAPES, _models

import fusedmerge

mk_api = pytest.importorskip("mergekit.merge_methods.api")

W = [1.0, 0.5, 2.0]


def _both(method, base, models, name, params, **options):
    """fusedmerge's result and mergekit's — for bf16 models mergekit's computed in fp32 (dtype=float32) and
    rounded to bf16, fusedmerge's arithmetic (mergekit's own bf16 run also rounds each δ, product and sum:
    the bound of test_della.assert_bf16_close)."""
    inputs = [base[name], *(m[name] for m in models)]
    want = mk_api.merge_tensors(inputs, method, parameters=params, base_index=0, dtype=torch.float32)
    want = want.to(base[name].dtype)
    got = fusedmerge.breadcrumbs(base[name], [m[name] for m in models], consensus=method == "breadcrumbs_ties",
                                 **options)
    return got, want


def _threshold_ties(base, models, densities, gammas):
    """Entries where some model's |τ| equals a value of its band's edge held by several entries: fusedmerge
    keeps them all, mergekit those its argsort puts inside (bf16 models' deltas tie often)."""
    tied = torch.zeros_like(base, dtype=torch.bool)
    for m, d, g in zip(models, densities, gammas):
        mag = (m.float() - base.float()).abs()
        n = mag.numel()
        target, n_top = int(d * n), int(g * n)
        n_bot = max(0, n - target - n_top)
        values = mag.flatten().sort().values
        for edge in (values[n_bot], values[n_bot + target - 1]):
            if int((mag == edge).sum()) > 1:
                tied |= mag == edge
    return tied


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_equals_mergekit_on_clip_and_llama_shaped_tensors(method, dtype):
    base, models = _models(SHAPES, n=3, seed=2, dtype=dtype)
    rescale = method == "breadcrumbs" and dtype == torch.float32  # a tie kept changes the whole L1 factor
    params = {"weight": W, "density": [0.5, 0.3, 0.8], "gamma": [0.05, 0.1, 0.01], "lambda": 0.8, "normalize": True,
              "rescale": rescale}
    for name in SHAPES:
        got, want = _both(method, base, models, name, params, weights=W, density=params["density"],
                          gamma=params["gamma"], scaling=0.8, normalize=True, rescale=rescale)
        assert got.dtype == want.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6, msg=name)
            continue
        same = ~_threshold_ties(base[name], [m[name] for m in models], params["density"], params["gamma"])
        ulp = 2.0 ** (torch.frexp(want.float())[1] - 8)
        off = (got.float() - want.float()).abs()
        assert float(same.double().mean()) > 0.8, name  # bf16 deltas are coarse: many tie at the edges
        assert bool((off <= ulp)[same].all()) and float((off[same] == 0).double().mean()) > 0.99, name


def test_default_density_is_task_arithmetic_and_small_tensors_keep_their_band():
    base, models = _models({"w": (7, 9), "b": (50,)}, n=2, seed=3)
    want = fusedmerge.task_arithmetic(base, models, 1.0)
    got = fusedmerge.breadcrumbs(base, models, gamma=0.3)
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=2e-7)
    # 50 entries, γ = 0.01: n_top = 0, so the smallest 25 are dropped and the 25 largest kept (not all zeroed)
    got = fusedmerge.breadcrumbs(base["b"], [models[0]["b"]], density=0.5)
    tau = (models[0]["b"] - base["b"]).abs()
    kept = (got - base["b"]) != 0
    assert int(kept.sum()) == 25 and bool(tau[kept].min() > tau[~kept].max())


@pytest.mark.parametrize("density, gamma", [(0.995, 0.01), (0.2, 0.9), (0.001, 0.1)])
def test_band_edges_equal_mergekit(density, gamma):
    """target + n_top > n keeps the smallest `target`; target = 0 keeps nothing."""
    base, models = _models({"w": (40, 30)}, n=1, seed=5)
    got, want = _both("breadcrumbs", base, models, "w", {"weight": 1.0, "density": density, "gamma": gamma},
                      density=density, gamma=gamma)
    torch.testing.assert_close(got, want, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("options, match", [({"gamma": 1.5}, "gamma"), ({"density": 0.0}, "density"),
                                            ({"gamma": [0.1, "x"]}, "gamma"), ({"density": [0.5, 0.5, 0.5]}, "density")])
def test_bad_options_are_refused_by_name(options, match):
    base, models = _models({"w": (4, 4)}, n=2)
    with pytest.raises((TypeError, ValueError), match=match):
        fusedmerge.breadcrumbs(base, models, **options)


def test_mergekit_plugin_takes_per_model_gamma():
    from fusedmerge.integrations import mergekit as plugin

    base, models = _models({"w": (16, 32)}, n=2, seed=3)
    sds = {"base": base, "m0": models[0], "m1": models[1]}
    params = {"weight": 1.0, "density": 0.5, "gamma": {"m0": 0.02, "m1": 0.2}}
    try:
        plugin.install(replace=False)
        got = mk_api.merge_state_dicts(sds, "fused_breadcrumbs_ties", parameters=params, base="base")
    finally:
        plugin.uninstall()
    want = mk_api.merge_state_dicts(sds, "breadcrumbs_ties", parameters=params, base="base")
    torch.testing.assert_close(got["w"], want["w"], rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_chunks_merge_the_whole_tensors_bits(monkeypatch, dtype):
    """A tensor merged CHUNK elements at a time (uneven last chunk) equals the tensor merged in one chunk,
    bit for bit, with the L1 rescale and with the vote; a transposed (non-contiguous) base is taken too."""
    from fusedmerge.methods import breadcrumbs as module

    g = torch.Generator().manual_seed(5)
    base = torch.randn(29, 37, generator=g).to(dtype).t()
    models = [base + 0.1 * torch.randn(37, 29, generator=g).to(dtype) for _ in range(3)]
    for options in ({"consensus": True, "normalize": True, "rescale": True}, {"rescale": True}):
        kw = dict(weights=W, density=[0.5, 0.3, 1.0], gamma=[0.05, 0.1, 0.01], scaling=0.8, backend="cpu", **options)
        monkeypatch.setattr(module, "CHUNK", 1 << 30)
        whole = fusedmerge.breadcrumbs(base, models, **kw)
        monkeypatch.setattr(module, "CHUNK", 100)
        chunked = fusedmerge.breadcrumbs(base, models, **kw)
        assert torch.equal(whole.view(torch.uint8), chunked.view(torch.uint8)), options
