"""Non-finite numbers. Coefficients that are not finite in the accumulation dtype are refused, naming the
argument (they would turn even a zero task vector into NaN); finite-in-fp64 ones still run with fp64
inputs. NaN and Inf inside input tensors give what README's "Reliability" section says, on every backend."""

import pytest
import torch

import fusedmerge
from conftest import STATUS, same_bits
from fusedmerge.opcm import ContinualMerger
from fusedmerge.philox import drop_threshold, keep_mask, mask_key

FLT_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("call, arg", [
    (lambda b, ms: fusedmerge.task_arithmetic(b, ms, 1e39), "scaling·weights"),
    (lambda b, ms: fusedmerge.task_arithmetic(b, ms, 1.0, weights=[1.0, 1e39]), "scaling·weights"),
    (lambda b, ms: fusedmerge.weighted_sum(ms, [1e39, 1.0]), "coeffs"),
    (lambda b, ms: fusedmerge.average(ms + [b], [1e39, -1e39, 1.0]), "weights"),
    (lambda b, ms: fusedmerge.dare(b, ms, 0.5, scaling=1e39), "scaling·weights"),
    (lambda b, ms: fusedmerge.ties(b, ms, scaling=1e39), "scaling"),
    (lambda b, ms: fusedmerge.ties(b, ms, weights=[1e39, 1.0]), "weights"),
], ids=["ta scaling", "ta weights", "weighted_sum", "average", "dare", "ties scaling", "ties weights"])
def test_coefficients_not_finite_in_fp32_are_refused_naming_the_argument(call, arg):
    base = torch.ones(5)
    with pytest.raises(ValueError, match=f"{arg}: the coefficient of input .* not finite in torch.float32"):
        call(base, [base.clone(), base.clone()])  # zero task vectors: the exact result is finite


def test_coefficients_finite_in_the_accumulation_dtype_still_run():
    base = torch.linspace(-1, 1, 7, dtype=torch.float64)
    assert torch.equal(fusedmerge.task_arithmetic(base, [base.clone()], 1e39), base)  # fp64: 1e39 is finite
    zeros = torch.zeros(4)
    assert torch.equal(fusedmerge.weighted_sum([zeros, zeros], [FLT_MAX, -FLT_MAX]), zeros)  # the largest fp32


BACKENDS = [b for b in ("torch", "cpu") if STATUS[b].available]
METHODS = {
    "average": lambda b, ms, be: fusedmerge.average(ms, backend=be),
    "task_arithmetic": lambda b, ms, be: fusedmerge.task_arithmetic(b, ms, 0.5, backend=be),
    "dare": lambda b, ms, be: fusedmerge.dare(b, ms, 0.5, seed=3, backend=be),
    "ties": lambda b, ms, be: fusedmerge.ties(b, ms, density=1.0, backend=be),
}
# What element 3 becomes when it is NaN or +Inf in model 1 or in the base (README, "Reliability").
EXPECTED = {
    ("average", "model"): "same", ("average", "base"): "clean",  # average has no base
    ("task_arithmetic", "model"): "same", ("task_arithmetic", "base"): "nan",
    ("dare", "model"): "same if kept", ("dare", "base"): "nan",
    ("ties", "model"): {"nan": "finite", "inf": "inf"}, ("ties", "base"): "nan",
}


@pytest.mark.parametrize("where", ["model", "base"])
@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("method", list(METHODS))
def test_nan_and_inf_in_inputs_give_what_readme_says(method, value, where):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    models = [base + 0.1 * torch.randn(64, generator=g) for _ in range(3)]
    clean = METHODS[method](base, models, "torch")
    bad_base, bad_models = base.clone(), [m.clone() for m in models]
    (bad_models[1] if where == "model" else bad_base)[3] = float(value)
    results = [METHODS[method](bad_base, bad_models, be) for be in BACKENDS]
    assert all(same_bits(r, results[0]) for r in results)  # every backend equals the reference
    got = results[0]
    others = torch.arange(64) != 3
    assert torch.equal(got[others], clean[others])  # elementwise: only element 3 is touched
    expect = EXPECTED[(method, where)]
    expect = expect[value] if isinstance(expect, dict) else expect
    if expect == "same if kept":
        kept = keep_mask(mask_key(3, 1, "tensor"), 64, drop_threshold(0.5))[3]
        expect = "same" if kept else "finite"
    if expect == "same":
        expect = value
    if expect == "nan":
        assert got[3].isnan()
    elif expect == "inf":
        assert got[3] == float("inf")
    elif expect == "clean":
        assert got[3] == clean[3]
    else:
        assert got[3].isfinite()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_opcm_spreads_a_non_finite_value_through_the_projected_matrix(value):
    g = torch.Generator().manual_seed(0)
    base = {"fc.weight": torch.randn(6, 6, generator=g), "fc.bias": torch.randn(6, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    models[1]["fc.weight"][2, 2] = float(value)
    merger = ContinualMerger(base, 0.5, projectable=["fc.weight"])
    for m in models:
        merger.add(m)
    assert not merger.merged()["fc.weight"].isfinite().any()


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("call", [
    lambda b, ms: fusedmerge.slerp(b, [ms[1]], 0.5),
    lambda b, ms: fusedmerge.model_stock(b, ms),
    lambda b, ms: fusedmerge.sce(b, ms, select_topk=1.0),
], ids=["slerp", "model_stock", "sce"])
def test_methods_with_coefficients_from_the_tensors_name_the_tensor_holding_nan_or_inf(call, value):
    """Their coefficients (angles, norms, variances) come from the whole tensor: a NaN or Inf in it is refused,
    naming the key and the cause instead of the user's argument."""
    g = torch.Generator().manual_seed(0)
    base = {"layer.w": torch.randn(64, generator=g)}
    models = [{"layer.w": base["layer.w"] + 0.1 * torch.randn(64, generator=g)} for _ in range(2)]
    models[1]["layer.w"][3] = float(value)
    with pytest.raises(ValueError, match="layer.w: its tensors hold NaN or Inf values"):
        call(base, models)
