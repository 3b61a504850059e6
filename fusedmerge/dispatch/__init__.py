"""Backend registry, availability and selection.

Backends: ``torch`` (the reference, any device), ``cpu`` (C++/OpenMP), ``cuda`` (CUDA C++), ``triton``.
``backend="auto"`` takes, for the tensors' device, the first available of ``AUTO_ORDER``; the
``FUSEDMERGE_BACKEND`` environment variable replaces "auto" when set; an explicit argument wins over both.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch

from .. import reference
from ..reference import CombineJob
from ._table import kernel_supports

NAMES = ("torch", "cpu", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
ENV_VAR = "FUSEDMERGE_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, on which device types, and why not when it cannot."""

    available: bool
    devices: tuple
    reason: str


def _import(module: str):
    return importlib.import_module(f"{__name__}.{module}")


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _status_cpu() -> BackendStatus:
    try:
        from .. import _cpu
    except ImportError as e:
        return BackendStatus(False, (), f"not built: the C++ extension failed to import ({e})")
    return BackendStatus(True, ("cpu",), f"C++/OpenMP, {_cpu.isa()} kernels, {_cpu.max_threads()} threads")


def _status_cuda() -> BackendStatus:
    try:
        from .. import _cuda
    except ImportError:
        return BackendStatus(False, (), "not built: no CUDA compiler when fusedmerge was built")
    if _cuda.device_count() == 0 or _gpu_count() == 0:
        return BackendStatus(False, (), "no GPU: the CUDA extension is built but no CUDA device is visible")
    return BackendStatus(True, ("cuda",), f"CUDA C++, {_gpu_count()} device(s)")


def _status_triton() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except ImportError:
        return BackendStatus(False, (), "triton not installed (pip install 'fusedmerge[triton]')")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return BackendStatus(True, ("cpu",), f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors")
    if _gpu_count() == 0:
        return BackendStatus(False, (), "no GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)")
    return BackendStatus(True, ("cuda",), f"triton {triton.__version__} on GPU")


_STATUS: Dict[str, Callable[[], BackendStatus]] = {
    "torch": lambda: BackendStatus(True, ("cpu", "cuda", "any"), "plain torch reference"),
    "cpu": _status_cpu,
    "cuda": _status_cuda,
    "triton": _status_triton,
}


def backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it is available here and, if not, why."""
    return {name: _STATUS[name]() for name in NAMES}


def resolve(backend: str, device: torch.device) -> str:
    """The backend name that runs tensors on `device` for the user's choice `backend`."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + NAMES}, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        source = f"environment variable {ENV_VAR}"
    else:
        source = "backend argument"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if _STATUS[name]().available and (name == "torch" or device.type in _STATUS[name]().devices):
                return name
        return "torch"
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r} from the {source}; choose one of {('auto',) + NAMES}")
    status = _STATUS[backend]()
    if not status.available:
        raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
    if backend != "torch" and device.type not in status.devices:
        raise ValueError(f"backend {backend!r} does not run on {device.type} tensors (runs on {status.devices})")
    return backend


def combine(jobs: Sequence[CombineJob], backend: str) -> None:
    """Run linear-combination jobs (all on one device) on `backend`, one launch per number of inputs;
    jobs no kernel handles (other dtypes) go to the torch reference, which defines the result anyway."""
    jobs = [j for j in jobs if j.out.numel() > 0]
    if not jobs:
        return
    name = resolve(backend, jobs[0].out.device)
    fits = [name != "torch" and kernel_supports(j) for j in jobs]
    if not all(fits):
        reference.combine([j for j, f in zip(jobs, fits) if not f])
    by_count: Dict[int, List[CombineJob]] = {}
    for job, fit in zip(jobs, fits):
        if fit:
            by_count.setdefault(len(job.inputs), []).append(job)
    for group in by_count.values():
        _import(name).combine(group)


def ties(jobs: Sequence[CombineJob], spec, backend: str) -> None:
    """TIES over all `jobs` (one device, none empty: spec is indexed by job) on `backend`. Under "auto", a
    backend without a TIES kernel (cuda) hands over to the next one that has one (triton); the reference
    runs where no kernel applies (fp64 or unsupported dtypes)."""
    device = jobs[0].out.device
    name = resolve(backend, device)
    module = _import(name) if name != "torch" else None
    fits = all(kernel_supports(j) and j.acc_dtype == torch.float32 for j in jobs)
    if module is not None and not hasattr(module, "ties"):
        if backend != "auto" or os.environ.get(ENV_VAR, "auto") not in ("", "auto"):
            raise RuntimeError(f"backend {name!r} has no TIES kernel yet; use 'triton', 'cpu' or 'torch'")
        others = [n for n in AUTO_ORDER.get(device.type, ()) if n not in (name, "torch")
                  and _STATUS[n]().available and device.type in _STATUS[n]().devices]
        module = next((m for m in map(_import, others) if hasattr(m, "ties")), None)
    if module is not None and fits:
        module.ties(jobs, spec)
    else:
        reference.ties_reference(jobs, spec)


def l1_buckets(jobs: Sequence[CombineJob], backend: str):
    """Exact L1 norm buckets of every job ([jobs, N, 2, 256], reference.l1_buckets_reference) on the
    backend that will merge them; a backend without that kernel (cuda) hands over as for TIES."""
    device = jobs[0].out.device
    name = resolve(backend, device)
    candidates = [name] + [n for n in AUTO_ORDER.get(device.type, ()) if n not in (name, "torch")
                           and _STATUS[n]().available and device.type in _STATUS[n]().devices]
    if all(kernel_supports(j) for j in jobs):
        for candidate in candidates:
            module = _import(candidate) if candidate != "torch" else None
            if module is not None and hasattr(module, "l1_buckets"):
                return module.l1_buckets(jobs)
    return torch.stack([reference.l1_buckets_reference(j) for j in jobs])
