"""Model Stock against the real peers: mergekit 0.1.5's model_stock (merge_tensors, the plugin, configs through
`fusedmerge merge`) and FusionBench 0.2.33's compute_angle / compute_ratio / merge_weights and ModelStock;
the singular and opposite cases; bad input."""

import copy

import pytest
import torch

import fusedmerge
from conftest import load_model_dir
from fusedmerge import cli
from fusedmerge.methods.model_stock import gram, ratios

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
fb_model_stock = pytest.importorskip("fusion_bench.method.model_stock.model_stock")


def _models(shape, n, dtype=torch.float32, seed=0, shared=0.05):
    """A base and n fine-tuned tensors whose task vectors share a direction (so the cosines are positive)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = shared * torch.randn(shape, generator=g)
    return base.to(dtype), [(base + common + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def _close(got, want, ulps):
    """Within `ulps` units in the last place of want's dtype, relative to each element's magnitude."""
    eps = torch.finfo(want.dtype).eps
    bound = ulps * eps * want.double().abs().clamp(min=1.0)
    return bool(((got.double() - want.double()).abs() <= bound).all())


@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 4), (torch.float64, 4), (torch.bfloat16, 2)], ids=str)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("shape, filter_wise", [((64, 48), False), ((64, 48), True), ((300,), True),
                                                 ((4, 6, 10), True), ((4, 6, 10), False)], ids=str)
def test_equals_mergekit_up_to_its_rounding(shape, filter_wise, n, dtype, ulps):
    """mergekit computes in the inputs' dtype; fusedmerge's Gram is fp64 and its merge fp32, rounded once."""
    base, xs = _models(shape, n, dtype, seed=n)
    want = mergekit_api.merge_tensors([base, *xs], "model_stock", parameters={"filter_wise": filter_wise},
                                      base_index=0)
    got = fusedmerge.model_stock(base, xs, filter_wise=filter_wise)
    assert got.dtype == want.dtype and _close(got, want, ulps), (got.double() - want.double()).abs().max()


def test_ratio_rule_and_the_singular_case():
    """t = N·c/(1 + (N−1)·c) from the mean cosine; opposite task vectors (c = −1/(N−1)) keep the base."""
    base = torch.zeros(1000, dtype=torch.float64)
    tau = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = fusedmerge.model_stock(base, [tau, -tau])
    assert torch.equal(got, base)
    same = fusedmerge.model_stock(base, [tau, tau.clone(), tau.clone()])  # c = 1: t = 1, the average
    assert torch.allclose(same, tau, rtol=0, atol=1e-12)
    g = gram(base, [tau, 2 * tau, -tau], 1)
    c = (1 + (-1) + (-1)) / 3
    assert torch.allclose(ratios(g, "mergekit"), torch.tensor([3 * c / (1 + 2 * c)], dtype=torch.float64))


def test_fusionbench_variant_equals_its_functions():
    """N = 2: compute_angle, compute_ratio, merge_weights on state dicts (FusionBench's fp32 arithmetic)."""
    base, (a, b) = _models((40, 30), 2, seed=7)
    sd = lambda t: {"w": t, "v": t[0].clone()}  # noqa: E731
    angles = fb_model_stock.compute_angle(sd(a), sd(b), sd(base))
    want = fb_model_stock.merge_weights(sd(a), sd(b), sd(base), fb_model_stock.compute_ratio(angles, k=2))
    got = fusedmerge.model_stock(sd(base), [sd(a), sd(b)], variant="fusionbench")
    for k in want:
        assert _close(got[k], want[k], 4), k


def test_fusionbench_class_with_ignored_keys():
    pytest.importorskip("transformers")
    from fusion_bench import BaseModelPool
    from fusion_bench.method.model_stock.model_stock import ModelStock

    from conftest import tiny_clip_modules
    from fusedmerge.integrations.fusion_bench import FusedModelStock

    base, models = tiny_clip_modules(3, seed=5)
    ignored = ["post_layernorm.weight", "embeddings.class_embedding"]
    pool = lambda: BaseModelPool({"_pretrained_": copy.deepcopy(base),  # noqa: E731
                                  **{f"m{i}": copy.deepcopy(m) for i, m in enumerate(models)}})
    want = ModelStock(ignore_keys=ignored).run(pool()).state_dict()
    got = FusedModelStock(ignore_keys=ignored).run(pool()).state_dict()
    assert list(got) == list(want)
    for k in want:
        assert _close(got[k], want[k], 8) if want[k].is_floating_point() else torch.equal(got[k], want[k]), k
    mean = sum(m.state_dict()[ignored[0]] for m in models) / 3
    assert torch.allclose(got[ignored[0]], mean, rtol=0, atol=1e-6)


def test_plugin_registers_model_stock():
    from fusedmerge.integrations import mergekit as plugin

    base, xs = _models((32, 16), 3, torch.bfloat16, seed=2)
    try:
        assert "fm_model_stock" in plugin.install(replace=False, prefix="fm_")
        for fw in (False, True):
            want = mergekit_api.merge_tensors([base, *xs], "model_stock", parameters={"filter_wise": fw}, base_index=0)
            got = mergekit_api.merge_tensors([base, *xs], "fm_model_stock", parameters={"filter_wise": fw},
                                             base_index=0)
            assert torch.equal(got, fusedmerge.model_stock(base, xs, filter_wise=fw)) and _close(got, want, 2)
    finally:
        plugin.uninstall()


@pytest.fixture
def ckpts(small_llama_ckpts):
    return small_llama_ckpts


def test_merge_cli_runs_a_model_stock_config(ckpts, tmp_path):
    cfg = tmp_path / "ms.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {ckpts / 'base'}\nmodels:\n  - model: {ckpts / 'base'}\n"
                   + "".join(f"  - model: {ckpts / f'm{i}'}\n" for i in range(3))
                   + "parameters: {filter_wise: true}\ndtype: bfloat16\n")
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 0
    got, base = load_model_dir(tmp_path / "out"), load_model_dir(ckpts / "base")
    models = [load_model_dir(ckpts / f"m{i}") for i in range(3)]
    want = fusedmerge.model_stock(base, models, filter_wise=True)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    k = "model.layers.1.mlp.up_proj.weight"
    peer = mergekit_api.merge_tensors([base[k], *(m[k] for m in models)], "model_stock",
                                      parameters={"filter_wise": True}, base_index=0)
    assert _close(got[k], peer, 2)


def test_bad_input_is_refused(ckpts, tmp_path, capsys):
    base, xs = _models((8,), 2)
    with pytest.raises(ValueError, match="at least two"):
        fusedmerge.model_stock(base, xs[:1])
    with pytest.raises(ValueError, match="filter_wise"):
        fusedmerge.model_stock(base, xs, filter_wise=True, variant="fusionbench")
    with pytest.raises(TypeError, match="filter_wise"):
        fusedmerge.model_stock(base, xs, filter_wise="yes")
    cfg = tmp_path / "one.yml"
    cfg.write_text(f"merge_method: model_stock\nbase_model: {ckpts / 'base'}\nmodels: [{{model: {ckpts / 'm0'}}}]\n")
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 2
    assert "at least two models" in capsys.readouterr().err and not (tmp_path / "out").exists()
