"""The package as installed: extensions built, Triton kernels inside the fusedmerge namespace."""

import importlib.util

import pytest

import fusedmerge
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


ISA_CHECK = """
import torch, fusedmerge
from fusedmerge import _cpu
from fusedmerge.philox import mask_key, random_words
g = torch.Generator().manual_seed(0)
base = {"w": torch.randn(70001, generator=g).bfloat16(), "v": torch.randn(3001, generator=g)}
models = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()} for _ in range(3)]
u = random_words(mask_key(0, 1, "w"), 70001)
p = int(u[12345]) / 2**32  # a threshold whose high half ties with an element's: the low halves decide
calls = [lambda b: fusedmerge.dare(base, models, p, backend=b),
         lambda b: fusedmerge.dare(base, models, 0.9, rescale="l1", backend=b),
         lambda b: fusedmerge.ties(base, models, density=0.2, backend=b),
         lambda b: fusedmerge.ties(base, models, density=0.3, scope="model", merge="mean", backend=b),
         lambda b: fusedmerge.ties(base, models, dare_p=0.5, merge="max", backend=b),
         lambda b: fusedmerge.task_arithmetic(base, models, 0.3, backend=b)]
for f in calls:
    got, want = f("cpu"), f("torch")
    assert all(torch.equal(got[k].view(torch.int16 if got[k].dtype == torch.bfloat16 else torch.int32),
                           want[k].view(torch.int16 if want[k].dtype == torch.bfloat16 else torch.int32)) for k in got)
from fusedmerge import dispatch
from fusedmerge.reductions import DotsJob, DotsSpec
jobs = [DotsJob([m[k] for m in models], base[k]) for k in base] + [DotsJob([m["v"][:n] for m in models])
                                                                  for n in (1, 5, 17, 100, 257, 1000, 2100)]
spec = DotsSpec(((0, 1), (0, 2), (1, 1)))  # the dots kernel's vector lanes, reused and single inputs
assert all(torch.equal(a.view(torch.int64), b.view(torch.int64))
           for a, b in zip(dispatch.run("dots", jobs, "cpu", spec), dispatch.run("dots", jobs, "torch", spec)))
print(_cpu.isa())
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_variant_equals_the_reference(isa, tmp_path):
    """Each ISA build (the generic loops as well as the AVX-512 intrinsics) on DARE, TIES and their tails."""
    import os
    import subprocess
    import sys

    from fusedmerge import _cpu

    supported = {"baseline": ["baseline"], "avx2": ["baseline", "avx2"], "avx512": ["baseline", "avx2", "avx512"]}
    if isa not in supported[_cpu.isa()]:
        pytest.skip(f"this CPU runs at most the {_cpu.isa()} variant")
    env = {**os.environ, "FUSEDMERGE_CPU_ISA": isa}
    # run outside the checkout, whose fusedmerge/ source folder would shadow the installed package
    out = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == isa


def test_unknown_cpu_variant_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "FUSEDMERGE_CPU_ISA": "sse9"}
    out = subprocess.run([sys.executable, "-c", "from fusedmerge import _cpu; _cpu.isa()"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "FUSEDMERGE_CPU_ISA=sse9" in out.stderr


@pytest.mark.parametrize("collecting", [True, False])
def test_import_leaves_the_garbage_collector_as_it_found_it(collecting):
    """`import fusedmerge` pauses the cyclic collector while it imports torch and the methods, then restores
    the caller's setting."""
    import subprocess
    import sys

    code = (f"import gc\nif not {collecting}:\n    gc.disable()\n"
            "import fusedmerge\nprint(gc.isenabled(), 'average' in dir(fusedmerge))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(collecting), "True"]
