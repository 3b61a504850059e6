"""Benchmark workloads: CLIP ViT state dicts per (model, N, dtype) on the benchmark device, one
configuration held at a time."""

import os

import torch

from fusedmerge.synthetic import clip_vit_base

DEVICE = torch.device(os.environ.get("FUSEDMERGE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
_HELD = {}


def memory_budget() -> int:
    """Bytes a configuration may hold: 45 % of the host memory, 60 % of the device's memory (not of what is free now, which
    depends on the configuration still held from the previous test)."""
    if DEVICE.type == "cuda":
        return int(torch.cuda.get_device_properties(DEVICE).total_memory * 0.6)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.45)


def models(name: str, n: int, dtype: torch.dtype):
    """Base + n variants on DEVICE. Variants are base + (i+1)·δ with one shared random δ per key: the
    values don't matter for timing, and this keeps building large configurations fast."""
    key = (name, n, dtype)
    if key not in _HELD:
        _HELD.clear()
        base = {k: v.to(DEVICE) for k, v in clip_vit_base(name, dtype=dtype).items()}
        g = torch.Generator().manual_seed(1)
        delta = {k: (torch.randn(v.shape, generator=g) * 1e-3).to(DEVICE, dtype) for k, v in base.items()}
        variants = [{k: base[k] + (i + 1) * delta[k] for k in base} for i in range(n)]
        _HELD[key] = (base, variants)
    return _HELD[key]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn) -> int:
    """Peak resident memory above the starting level while fn() runs (sampled every millisecond), in bytes;
    on CUDA, the allocator's peak above the starting allocation. Free heap memory is first returned to the
    system (malloc_trim), so that temporaries show up in the resident size instead of reusing it."""
    import ctypes
    import gc
    import threading

    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        start = torch.cuda.memory_allocated(DEVICE)
        fn()
        torch.cuda.synchronize(DEVICE)
        return torch.cuda.max_memory_allocated(DEVICE) - start
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    start, peak, done = rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            done.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], rss_bytes()) - start
