"""The package as installed: extensions built, Triton kernels inside the fusedmerge namespace."""

import importlib.util

import fusedmerge
import pytest

from conftest import STATUS


def test_cpu_extension_is_built():
    assert STATUS["cpu"].available, STATUS["cpu"].reason
    from fusedmerge import _cpu

    assert _cpu.isa() in ("baseline", "avx2", "avx512")
    assert _cpu.max_threads() >= 1


def test_triton_kernels_live_inside_fusedmerge():
    spec = importlib.util.find_spec("fusedmerge.triton_kernels.combine")
    assert spec is not None and "fusedmerge" in spec.origin
    top = importlib.util.find_spec("triton_kernels")
    assert top is None or "fusedmerge" not in (top.origin or "")


def test_every_backend_reports_why_it_is_missing():
    status = fusedmerge.backends()
    assert set(status) == {"torch", "cpu", "cuda", "triton"}
    assert status["torch"].available
    for name, s in status.items():
        assert isinstance(s.reason, str) and s.reason
        if not s.available:
            assert any(word in s.reason for word in ("not built", "no GPU", "not installed")), (name, s.reason)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_runs_on_cpu_under_the_interpreter_or_on_gpu():
    assert STATUS["triton"].available, STATUS["triton"].reason
