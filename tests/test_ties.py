"""TIES: the C++ kernel equals the sort-based reference bit for bit; the reference reproduces FusionBench's
and mergekit's algorithms (transcribed here in plain torch) under their options."""

import pytest
import torch

import fusedmerge
from conftest import CPU_BACKENDS, assert_dicts_equal
from fusedmerge import dispatch
from fusedmerge.methods.ties import kept_count

OPTION_SETS = [
    dict(),
    dict(scope="model"),
    dict(merge="mean"),
    dict(merge="max", elect="count"),
    dict(scope="model", k_rule="fusionbench", vote_tie="majority"),
    dict(weights=[1.0, -2.0, 0.5, 3.0], weighted_vote=False, merge="mean"),
    dict(dare_p=0.6),
    dict(dare_p=0.6, rescale=False, merge="max", seed=3),
    dict(density=1.0, elect="count", vote_tie="majority"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_backends_equal_reference(clip_tiny, options, backend):
    base, models = clip_tiny
    options = {"density": 0.2, "scaling": 0.7, **options}
    assert_dicts_equal(fusedmerge.ties(base, models, backend=backend, **options),
                       fusedmerge.ties(base, models, backend="torch", **options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_cpu_equals_reference_on_vit_b32_blocks(clip_b32_as, dtype, scope):
    """Large scopes take the sampled-bracket selection; bf16 task vectors have many equal magnitudes."""
    base, models = clip_b32_as(dtype)
    keys = [k for k in base if ".layers.1." in k or "embeddings" in k]
    pick = lambda sd: {k: sd[k] for k in keys}  # noqa: E731
    base, models = pick(base), [pick(m) for m in models[:4]]
    for options in (dict(density=0.2), dict(density=0.05, merge="mean", vote_tie="majority")):
        assert_dicts_equal(fusedmerge.ties(base, models, scope=scope, backend="cpu", **options),
                           fusedmerge.ties(base, models, scope=scope, backend="torch", **options))


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_empty_scalar_and_integer_entries(scope):
    g = torch.Generator().manual_seed(0)
    sd = lambda: {"empty": torch.zeros(0, 3), "scalar": torch.randn((), generator=g),  # noqa: E731
                  "w": torch.randn(50, generator=g), "steps": torch.tensor(3)}
    base, models = sd(), [sd() for _ in range(3)]
    for backend in ("torch", "cpu"):
        got = fusedmerge.ties(base, models, density=0.5, scope=scope, backend=backend)
        assert got["empty"].shape == (0, 3) and got["steps"].item() == 3
    assert_dicts_equal(fusedmerge.ties(base, models, density=0.5, scope=scope, backend="cpu"),
                       fusedmerge.ties(base, models, density=0.5, scope=scope, backend="torch"))


def test_ties_at_the_threshold_are_kept():
    base = torch.zeros(1000)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).repeat(250)  # 250 of each magnitude
    for backend in ("torch", "cpu"):
        got = fusedmerge.ties(base, [x], density=0.3, backend=backend)  # k = 300: the 300th largest is 3
        assert int((got != 0).sum()) == 500 and torch.equal(got[x >= 3], x[x >= 3])
        got = fusedmerge.ties(base, [x], density=0.25, backend=backend)  # k = 250: the 250th largest is 4
        assert int((got != 0).sum()) == 250
        got = fusedmerge.ties(base, [x], density=0.25, k_rule="fusionbench", backend=backend)  # k = 251: 3
        assert int((got != 0).sum()) == 500
    assert kept_count(0.2, 1000, "floor") == 200 and kept_count(0.2, 1000, "fusionbench") == 201
    assert kept_count(1e-9, 10, "floor") == 1 and kept_count(1.0, 10, "fusionbench") == 10


def _fusionbench_ties(base, models, k_percent, merge, lam):
    """FusionBench 0.2.33 ties_merging, transcribed: global top-k over each model's sorted-key flat vector."""
    keys = sorted(base)
    flat = torch.stack([torch.cat([(m[k] - base[k]).flatten() for k in keys]) for m in models])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k_percent / 100), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * rows
    if merge == "sum":
        merged = selected.sum(dim=0)
    elif merge == "mean":
        merged = selected.sum(dim=0) / (selected != 0).sum(dim=0).float().clamp(min=1)
    else:
        merged = selected.abs().max(dim=0).values * sign
    out, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        out[k] = base[k] + lam * merged[offset:offset + n].reshape(base[k].shape)
        offset += n
    return out


def _mergekit_ties(base, models, density, weights):
    """mergekit 0.1.5 ties (magnitude sparsification, sum consensus, normalize=True), per tensor, transcribed."""
    out = {}
    for k in base:
        deltas = []
        for m in models:
            d = m[k] - base[k]
            keep = torch.zeros(d.numel(), dtype=torch.bool)
            keep[torch.argsort(d.abs().flatten(), descending=True)[: int(density * d.numel())]] = True
            deltas.append(d * keep.reshape(d.shape))
        w = torch.tensor(weights).reshape(-1, *([1] * base[k].dim()))
        wd = torch.stack(deltas) * w
        sign = wd.sum(dim=0).sign()
        sign[sign == 0] = 1
        mask = wd.sign() == sign
        mixed = (wd * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        out[k] = base[k] + mixed / divisor
    return out


@pytest.mark.parametrize("merge", ["sum", "mean", "max"])
def test_fusionbench_conventions(clip_tiny, merge):
    base, models = clip_tiny
    want = _fusionbench_ties(base, models, 20, merge, 0.3)
    got = fusedmerge.ties(base, models, density=0.2, scaling=0.3, scope="model", k_rule="fusionbench",
                          vote_tie="majority", merge=merge, backend="cpu")
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_mergekit_conventions(clip_tiny):
    base, models = clip_tiny
    weights = [0.5, 1.0, 2.0, 0.7]
    want = _mergekit_ties(base, models, 0.3, weights)
    got = fusedmerge.ties(base, models, density=0.3, weights=weights, merge="mean", backend="cpu")
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_same_result_for_every_key_order_and_tensor_by_tensor(clip_tiny):
    base, models = clip_tiny
    whole = fusedmerge.ties(base, models, density=0.3, dare_p=0.5, seed=1)
    rev = lambda sd: dict(reversed(list(sd.items())))  # noqa: E731
    assert_dicts_equal(fusedmerge.ties(rev(base), [rev(m) for m in models], density=0.3, dare_p=0.5, seed=1),
                       rev(whole))
    for k in base:
        one = fusedmerge.ties(base[k], [m[k] for m in models], density=0.3, dare_p=0.5, seed=1, name=k)
        assert torch.equal(one, whole[k]), k


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(density=0.0), ValueError, r"density .* \(0, 1\]"),
    (dict(density=1.5), ValueError, "density"),
    (dict(scope="layer"), ValueError, "unknown scope 'layer'"),
    (dict(elect="max"), ValueError, "unknown elect"),
    (dict(merge="median"), ValueError, "unknown merge"),
    (dict(k_rule="ceil"), ValueError, "unknown k_rule"),
    (dict(vote_tie="-"), ValueError, "unknown vote_tie"),
    (dict(dare_p=1.0), ValueError, "dare_p"),
    (dict(weights=[1.0]), ValueError, "weights has 1 entries"),
    (dict(weighted_vote="yes"), TypeError, "weighted_vote"),
])
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedmerge.ties(torch.zeros(4), [torch.ones(4), torch.ones(4)], **kwargs)


def test_a_backend_without_a_ties_kernel(monkeypatch):
    """An explicit choice says so; "auto" hands over to the next backend with a kernel, else the reference."""
    monkeypatch.setitem(dispatch.KERNELS, "ties", tuple(n for n in dispatch.KERNELS["ties"] if n != "cpu"))
    with pytest.raises(RuntimeError, match="backend 'cpu' has no TIES kernel"):
        fusedmerge.ties(torch.zeros(4), [torch.ones(4)], backend="cpu")
    x = torch.arange(8.0)
    assert torch.equal(fusedmerge.ties(torch.zeros(8), [x], density=0.5), torch.where(x >= 4, x, 0.0))


def test_per_model_densities_trim_each_model_at_its_own_fraction():
    base = torch.zeros(1000)
    models = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    both = fusedmerge.ties(base, models, density=[0.1, 0.3], merge="sum")
    one = [fusedmerge.ties(base, [m], density=d) for m, d in zip(models, [0.1, 0.3])]
    assert [int((o != 0).sum()) for o in one] == [100, 300]
    agree = (one[0] == 0) | (one[1] == 0) | (one[0].sign() == one[1].sign())
    assert torch.equal(both[agree], (one[0] + one[1])[agree])
    with pytest.raises(ValueError, match="density has 3 entries"):
        fusedmerge.ties(base, models, density=[0.1, 0.2, 0.3])
