"""Backends, the kernel primitives each one has, and the one fallback policy.

Backends: ``torch`` (the reference, any device), ``cpu`` (C++/OpenMP), ``cuda`` (CUDA C++), ``triton``.
Primitives are the kernel-level operations methods are made of (``PRIMITIVES``); each backend module
(dispatch/cpu.py, cuda.py, triton.py) defines a function of the primitive's name for every primitive it is
registered for in ``KERNELS``, the one place that says which backend has which kernel.

Policy, for ``run(primitive, jobs, backend)``:
- an explicit backend (the argument, or the ``FUSEDMERGE_BACKEND`` environment variable replacing "auto")
  that is missing here, or lacks the primitive, raises with the reason;
- ``auto`` takes, for the tensors' device, the first available backend of ``AUTO_ORDER`` that has the
  primitive (the torch reference last);
- jobs of dtypes no kernel handles go to the primitive's reference, which defines the result anyway.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import reductions, reference
from ..reference import CombineJob
from ._table import kernel_supports

NAMES = ("torch", "cpu", "cuda", "triton")
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
ENV_VAR = "FUSEDMERGE_BACKEND"
MAX_RANK_ROW = 1 << 16  # row_rank kernels take rows up to this length (Triton sorts a row in one program)


def _l1_reference(jobs: Sequence[CombineJob]) -> torch.Tensor:
    return torch.stack([reference.l1_buckets_reference(j) for j in jobs])


@dataclass(frozen=True)
class Primitive:
    """A kernel-level operation: its reference, which jobs a kernel takes (`supports`), and whether
    unsupported jobs split off to the reference one by one (`per_job`) or send the whole call there."""

    name: str
    title: str
    reference: Callable
    supports: Callable[[CombineJob], bool]
    per_job: bool


PRIMITIVES: Dict[str, Primitive] = {p.name: p for p in (
    Primitive("combine", "linear-combination", reference.combine, kernel_supports, per_job=True),
    Primitive("ties", "TIES", reference.ties_reference,
              lambda j: kernel_supports(j) and j.acc_dtype == torch.float32, per_job=False),
    Primitive("l1_buckets", "L1-norm", _l1_reference, kernel_supports, per_job=False),
    Primitive("select", "selection", reference.select_reference,
              lambda j: kernel_supports(j) and j.acc_dtype == torch.float32, per_job=False),
    Primitive("row_rank", "row-rank", reference.row_rank,
              lambda j: j.values.dtype == torch.float32 and j.values.is_contiguous() and j.values.dim() == 2
              and j.values.shape[1] <= MAX_RANK_ROW, per_job=False),
    Primitive("uniforms", "Philox-uniform", reference.uniforms,
              lambda j: j.out.dtype == torch.int32 and j.out.is_contiguous(), per_job=False),
    Primitive("dots", "sums-of-products", reductions.dots_reference,
              lambda j: kernel_supports(j.as_combine()) and len({x.dtype for x in j.inputs}) == 1, per_job=False),
)}
KERNELS: Dict[str, Tuple[str, ...]] = {
    "combine": ("cpu", "cuda", "triton"),
    "ties": ("cpu", "triton"),
    "l1_buckets": ("cpu", "triton"),
    "select": ("cpu", "triton"),
    "row_rank": ("cpu", "triton"),
    "uniforms": ("cpu", "triton"),
    "dots": ("cpu", "triton"),
}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, on which device types, why not when it cannot, and the primitives it
    has kernels for (the torch backend runs every primitive's reference)."""

    available: bool
    devices: tuple
    reason: str
    primitives: Tuple[str, ...] = ()


def _import(module: str):
    return importlib.import_module(f"{__name__}.{module}")


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _status_cpu() -> Tuple[bool, tuple, str]:
    try:
        from .. import _cpu
    except ImportError as e:
        return False, (), f"not built: the C++ extension failed to import ({e})"
    return True, ("cpu",), f"C++/OpenMP, {_cpu.isa()} kernels, {_cpu.max_threads()} threads"


def _status_cuda() -> Tuple[bool, tuple, str]:
    try:
        from .. import _cuda
    except ImportError:
        return False, (), "not built: no CUDA compiler when fusedmerge was built"
    if _cuda.device_count() == 0 or _gpu_count() == 0:
        return False, (), "no GPU: the CUDA extension is built but no CUDA device is visible"
    return True, ("cuda",), f"CUDA C++, {_gpu_count()} device(s)"


def _status_triton() -> Tuple[bool, tuple, str]:
    try:
        import triton
    except ImportError:
        return False, (), "triton not installed (pip install 'fusedmerge[triton]')"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ("cpu",), f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    if _gpu_count() == 0:
        return False, (), "no GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
    return True, ("cuda",), f"triton {triton.__version__} on GPU"


_STATUS: Dict[str, Callable[[], Tuple[bool, tuple, str]]] = {
    "torch": lambda: (True, ("cpu", "cuda", "any"), "plain torch reference"),
    "cpu": _status_cpu,
    "cuda": _status_cuda,
    "triton": _status_triton,
}


def status(name: str) -> BackendStatus:
    available, devices, reason = _STATUS[name]()
    has = tuple(PRIMITIVES) if name == "torch" else tuple(p for p, names in KERNELS.items() if name in names)
    return BackendStatus(available, devices, reason, has)


def backends() -> Dict[str, BackendStatus]:
    """Every backend with whether it is available here, why not, and the kernel primitives it has."""
    return {name: status(name) for name in NAMES}


def _runs_on(name: str, device: torch.device) -> bool:
    s = status(name)
    return s.available and (name == "torch" or device.type in s.devices)


def _choice(backend) -> Tuple[str, str]:
    """The user's choice after the environment variable, and where it came from."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + NAMES}, got {type(backend).__name__}")
    if backend == "auto":
        return os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}"
    return backend, "backend argument"


def resolve(backend: str, device: torch.device) -> str:
    """The backend that runs tensors on `device` for the user's choice `backend` (any primitive)."""
    backend, source = _choice(backend)
    if backend == "auto":
        return next((n for n in AUTO_ORDER.get(device.type, ()) if _runs_on(n, device)), "torch")
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r} from the {source}; choose one of {('auto',) + NAMES}")
    s = status(backend)
    if not s.available:
        raise RuntimeError(f"backend {backend!r} is not available: {s.reason}")
    if backend != "torch" and device.type not in s.devices:
        raise ValueError(f"backend {backend!r} does not run on {device.type} tensors (runs on {s.devices})")
    return backend


def select(primitive: str, backend: str, device: torch.device) -> Optional[str]:
    """The backend whose kernel runs `primitive` for tensors on `device`, or None for the reference."""
    name = resolve(backend, device)
    if _choice(backend)[0] != "auto":
        if name != "torch" and name not in KERNELS[primitive]:
            have = [n for n in KERNELS[primitive] if _runs_on(n, device)]
            raise RuntimeError(f"backend {name!r} has no {PRIMITIVES[primitive].title} kernel yet; "
                               f"use {' or '.join(repr(n) for n in have + ['torch'])}")
        return None if name == "torch" else name
    for candidate in AUTO_ORDER.get(device.type, ()):
        if candidate == "torch":
            return None
        if candidate in KERNELS[primitive] and _runs_on(candidate, device):
            return candidate
    return None


def run(primitive: str, jobs: Sequence[CombineJob], backend: str, *args):
    """Run `primitive` over `jobs` (all on one device) by the policy of the module docstring: linear
    combinations write their outputs (one launch per number of inputs); TIES writes its outputs;
    L1 buckets are returned ([jobs, N, 2, 256] int64, on the CPU); select returns the thresholds (int64
    [scopes, N] magnitude bits, on the CPU); row_rank and uniforms write their jobs' outputs; dots returns one
    fp64 [rows, pairs] tensor per job (fusedmerge/reductions.py: DotsJob, DotsSpec)."""
    prim = PRIMITIVES[primitive]
    if primitive == "combine":
        jobs = [j for j in jobs if j.out.numel() > 0]
        if not jobs:
            return None
    if not jobs:
        return [] if primitive == "dots" else None
    name = select(primitive, backend, jobs[0].device if primitive == "dots" else jobs[0].out.device)
    fits = [name is not None and prim.supports(j) for j in jobs]
    if not prim.per_job:
        if not all(fits):
            return prim.reference(jobs, *args)
        return getattr(_import(name), primitive)(jobs, *args)
    if not all(fits):
        prim.reference([j for j, f in zip(jobs, fits) if not f], *args)
    by_count: Dict[int, List[CombineJob]] = {}
    for job, fit in zip(jobs, fits):
        if fit:
            by_count.setdefault(len(job.inputs), []).append(job)
    for group in by_count.values():
        getattr(_import(name), primitive)(group, *args)
    return None
