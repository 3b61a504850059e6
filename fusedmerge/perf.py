"""Measuring against the memory-bandwidth limit: bytes a merge moves, and a plain copy of as many bytes
timed in the same run. Shared by the demo and the benchmarks."""

from __future__ import annotations

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
    size = lambda t: torch.empty((), dtype=dtype or t.dtype).element_size()  # noqa: E731
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
