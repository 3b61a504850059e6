"""Backend selection: auto, the environment variable, explicit choices, and the torch fallback."""

import pytest
import torch

import fusedmerge
from conftest import STATUS
from fusedmerge import dispatch


def test_auto_picks_the_cpp_backend_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("FUSEDMERGE_BACKEND", raising=False)
    assert dispatch.resolve("auto", torch.device("cpu")) == "cpu"


def test_environment_variable_replaces_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("FUSEDMERGE_BACKEND", "torch")
    assert dispatch.resolve("auto", torch.device("cpu")) == "torch"
    assert dispatch.resolve("cpu", torch.device("cpu")) == "cpu"


def test_forced_backend_is_the_one_that_runs(monkeypatch):
    calls = []
    real = dispatch._import

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(dispatch, "_import", spy)
    fusedmerge.average([torch.ones(3)] * 2, backend="cpu")
    assert calls == ["cpu"]
    monkeypatch.setenv("FUSEDMERGE_BACKEND", "torch")
    fusedmerge.average([torch.ones(3)] * 2)
    assert calls == ["cpu"]  # the reference ran, no kernel module


@pytest.mark.skipif(STATUS["cuda"].available, reason="checks the message of a missing CUDA backend")
def test_missing_backend_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: (not built|no GPU)"):
        fusedmerge.average([torch.ones(3)], backend="cuda")


def test_backend_refuses_tensors_of_another_device():
    with pytest.raises(ValueError, match="does not run on meta tensors"):
        dispatch.resolve("cpu", torch.device("meta"))


def test_dtypes_without_a_kernel_fall_back_to_the_reference():
    xs = [torch.randn(100).to(torch.float8_e4m3fn) for _ in range(3)]
    got = fusedmerge.average(xs, backend="cpu")
    assert got.dtype == torch.float8_e4m3fn
    assert torch.equal(got.float(), fusedmerge.average(xs, backend="torch").float())
