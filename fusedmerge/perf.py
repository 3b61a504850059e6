"""Measuring against the memory-bandwidth limit: bytes a merge moves, and a plain copy of as many bytes
timed in the same run; bit-for-bit comparison and the machine's name. Shared by the demo, the benchmarks
and the tests."""

from __future__ import annotations

import platform
import time
from typing import Callable, Dict, Iterable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Best wall time of `repeat` calls (after one warm-up call), synchronising the device."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def state_dict_bytes(sd: Dict[str, torch.Tensor], dtype: torch.dtype = None) -> int:
    """Bytes of a state dict's floating tensors (as `dtype` if given)."""
    size = lambda t: (dtype or t.dtype).itemsize  # noqa: E731
    return sum(t.numel() * size(t) for t in sd.values() if t.is_floating_point())


def merge_bytes(inputs: Iterable[Dict[str, torch.Tensor]], out_dtype: torch.dtype = None) -> int:
    """Bytes a fused merge must move at least: every input (and the base) read once, the result written once."""
    inputs = list(inputs)
    return sum(state_dict_bytes(sd) for sd in inputs) + state_dict_bytes(inputs[0], out_dtype)


class CopyLimit:
    """A device copy moving `nbytes` in all (nbytes/2 read, nbytes/2 written) into a warm buffer: the
    bandwidth limit a merge of the same byte count is compared with."""

    def __init__(self, nbytes: int, device: torch.device):
        half = max(nbytes // 2, 1)
        self.src = torch.ones(half, dtype=torch.uint8, device=device)
        self.dst = torch.zeros(half, dtype=torch.uint8, device=device)
        self.nbytes, self.device = 2 * half, device

    def __call__(self) -> None:
        self.dst.copy_(self.src)

    def seconds(self, repeat: int) -> float:
        return best_time(self, repeat, self.device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so +0 differs from -0), NaNs at the same places counting as equal."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a[~nan_a].view(ints), b[~nan_b].view(ints))


def cpu_name() -> str:
    """The CPU's model name (for benchmark records)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
