"""Bad input: a ValueError or TypeError that names the key or argument, and nothing modified."""

import math

import pytest
import torch

import fusedmerge


def sd(**shapes):
    return {k: torch.ones(s) for k, s in shapes.items()}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda b: fusedmerge.average([], backend=b), ValueError, "inputs is empty"),
        (lambda b: fusedmerge.average(torch.ones(3), backend=b), TypeError, "single Tensor"),
        (lambda b: fusedmerge.average({"a": torch.ones(1)}, backend=b), TypeError, "single dict"),
        (lambda b: fusedmerge.average(5, backend=b), TypeError, "sequence"),
        (lambda b: fusedmerge.average([torch.ones(2), {"a": torch.ones(2)}], backend=b), TypeError, "all be tensors"),
        (lambda b: fusedmerge.average([sd(a=2, b=3), sd(a=2)], backend=b), ValueError, r"inputs\[1\].*missing \['b'\]"),
        (lambda b: fusedmerge.average([sd(a=2), sd(a=2, c=1)], backend=b), ValueError, r"unexpected \['c'\]"),
        (lambda b: fusedmerge.average([sd(a=2, w=3), sd(a=2, w=4)], backend=b), ValueError, r"key 'w': shape \(4,\)"),
        (lambda b: fusedmerge.average([{"a": torch.ones(2)}, {"a": [1.0, 2.0]}], backend=b), TypeError, "key 'a'"),
        (lambda b: fusedmerge.average([torch.ones(2), torch.ones(2, dtype=torch.int64)], backend=b), ValueError,
         "floating and integer"),
        (lambda b: fusedmerge.average([torch.ones(2), torch.ones(2)], [1.0], backend=b), ValueError,
         "weights has 1 entries but there are 2 inputs"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, [1.0, math.nan], backend=b), ValueError, "weights must be finite"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, [1.0, math.inf], backend=b), ValueError, "weights must be finite"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, [1.0, -1.0], backend=b), ValueError, "sum to zero"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, ["a", "b"], backend=b), TypeError, "weights must be"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, out_dtype=torch.int32, backend=b), TypeError, "out_dtype"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, out_dtype="float16", backend=b), TypeError, "out_dtype"),
        (lambda b: fusedmerge.average([torch.ones(2, dtype=torch.complex64)] * 2, backend=b), TypeError, "complex"),
        (lambda b: fusedmerge.average([torch.ones(2)] * 2, out=torch.empty(3), backend=b), ValueError, "out is"),
        (lambda b: fusedmerge.task_arithmetic(torch.ones(2), [torch.ones(2)], math.nan, backend=b), ValueError, "scaling"),
        (lambda b: fusedmerge.task_arithmetic(torch.ones(2), [torch.ones(2)], "x", backend=b), TypeError, "scaling"),
        (lambda b: fusedmerge.task_arithmetic(sd(a=2), [torch.ones(2)], backend=b), TypeError, "base must be a tensor"),
        (lambda b: fusedmerge.task_arithmetic(sd(a=2), [sd(a=2, b=1)], backend=b), ValueError, r"base does not have"),
        (lambda b: fusedmerge.task_arithmetic(sd(a=3), [sd(a=2)], backend=b), ValueError, r"key 'a': shape"),
        (lambda b: fusedmerge.task_arithmetic(torch.ones(2), [torch.ones(2)], weights=[1, 2], backend=b), ValueError,
         "weights has 2 entries"),
    ],
)
def test_bad_input_is_named(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(backend)


def test_device_mismatch_is_named():
    meta = {"a": torch.ones(2), "w": torch.empty(2, device="meta")}
    with pytest.raises(ValueError, match="key 'w': device meta"):
        fusedmerge.average([{"a": torch.ones(2), "w": torch.ones(2)}, meta])


def test_integer_buffers_must_agree():
    a = {"w": torch.ones(2), "steps": torch.tensor(3)}
    b = {"w": torch.ones(2), "steps": torch.tensor(4)}
    with pytest.raises(ValueError, match="key 'steps'.*inputs\\[1\\] differs"):
        fusedmerge.average([a, b])
    with pytest.raises(ValueError, match="key 'steps'.*base"):
        fusedmerge.task_arithmetic(b, [a, a])


def test_bad_backend_choice(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fusedmerge.average([torch.ones(2)], backend="fast")
    with pytest.raises(TypeError, match="backend must be a string"):
        fusedmerge.average([torch.ones(2)], backend=None)
    monkeypatch.setenv("FUSEDMERGE_BACKEND", "nope")
    with pytest.raises(ValueError, match="environment variable FUSEDMERGE_BACKEND"):
        fusedmerge.average([torch.ones(2)])


def test_failed_call_leaves_out_untouched():
    out = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(ValueError):
        fusedmerge.average([sd(a=2, b=2), sd(a=2, b=3)], out=out)
    assert torch.equal(out["a"], torch.zeros(2)) and torch.equal(out["b"], torch.zeros(2))
