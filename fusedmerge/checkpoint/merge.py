"""`fusedmerge merge CONFIG OUT_DIR`: merge model directories tensor by tensor with bounded memory.

Plan (the same on every rank, from the headers alone): the output keys in the reference model's order
(the base, or the first model for linear), cut into shards of at most `shard_size` bytes, each shard owned
by one rank (balanced by bytes). A rank streams its keys in groups of at most half the memory budget: while
one group is merged, a writing thread writes the previous one (O_DIRECT where it can: shard_file.py) and a
prefetch thread reads the pages of the group after (madvise POPULATE_READ or WILLNEED); a merged group's
input pages are dropped (madvise DONTNEED) at once, or once written where an output is a view of them.
Shards are written as they fill, into a temporary directory beside OUT_DIR that is renamed to
OUT_DIR only when every rank has finished; a failure or a signal (SIGTERM, SIGINT, SIGHUP) anywhere removes
it and says why (checkpoint/outdir.py: OUT_DIR safety, atomic replacement, cleanup after a killed run).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from ..options import ConfigError
from .blocks import merge_tensor
from .config import MergeConfig
from .model_dir import ModelDir
from .outdir import Signals, Workspace, clean_stale, refuse_inputs
from .output import (
    ShardPlan,
    ShardWriter,
    check_config,
    check_same_vocabulary,
    copy_model_files,
    write_config,
    write_index,
    write_model_card,
)
from .plan import Plan
from .safetensors import CheckpointError


@dataclass
class Options:
    device: torch.device
    memory_budget: int
    backend: str = "auto"
    overwrite: bool = False
    progress: bool = True
    direct_io: bool = True  # shards written with O_DIRECT where the file system takes it (shard_file.py)


class Progress:
    """Tensors and bytes written, and the rate, on stderr (a line a second at most)."""

    def __init__(self, total_tensors: int, total_bytes: int, enabled: bool, rank: int):
        self.total, self.total_bytes, self.enabled, self.rank = total_tensors, total_bytes, enabled, rank
        self.done = self.bytes = 0
        self.start = self.last = time.perf_counter()

    def update(self, tensors: int, nbytes: int) -> None:
        self.done += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        if self.enabled and (now - self.last >= 1.0 or self.done == self.total):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9) / 1e6
            end = "\n" if self.done == self.total or not sys.stderr.isatty() else "\r"
            who = f"rank {self.rank}: " if self.rank else ""
            print(f"{who}{self.done}/{self.total} tensors, {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB "
                  f"written, {rate:.0f} MB/s", end=end, file=sys.stderr, flush=True)


def _check_architectures(reference: ModelDir, others: Sequence[Tuple[str, ModelDir]]) -> None:
    problems = []
    ref_keys = set(reference.where)
    for label, m in others:
        missing = sorted(ref_keys - set(m.where))
        extra = sorted(set(m.where) - ref_keys)
        shapes = [f"{k}: {m.entry(k)[1]} vs {reference.entry(k)[1]}" for k in reference.where
                  if k in m.where and m.entry(k)[1] != reference.entry(k)[1]]
        for what, items in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shapes)):
            if items:
                problems.append(f"{label} ({m.path}): {len(items)} {what}: {items[:10]}{' ...' if len(items) > 10 else ''}")
    if problems:
        raise CheckpointError("the models do not share one architecture:\n  " + "\n  ".join(problems))


def _groups(keys: Sequence[str], cost: Dict[str, int], limit: int) -> List[List[str]]:
    groups, current, size = [], [], 0
    for k in keys:
        if current and size + cost[k] > limit:
            groups.append(current)
            current, size = [], 0
        current.append(k)
        size += cost[k]
    if current:
        groups.append(current)
    return groups


def _touch(dirs: Sequence[ModelDir], reads: Sequence[Sequence[str]], after: Sequence[Future] = ()) -> None:
    """Read and map the group's pages now (in the prefetch thread) so that the merge finds them in memory;
    by touching one byte per page where the kernel cannot populate a range itself. reads: the tensors of
    each directory; after: writes to wait for first (their memory is needed for these pages)."""
    for w in after:
        w.result()
    for d, keys in zip(dirs, reads):
        d.check_unchanged()  # a truncated file's pages would end the process with SIGBUS
        if d.prefetch(keys):
            continue
        for k in keys:
            t = d.tensor(k)
            if t.numel():
                t.reshape(-1).view(torch.uint8)[:: 4096].sum()


def _write_group(writer: ShardWriter, outputs: List[Tuple[str, torch.Tensor]], dirs: Sequence[ModelDir],
                 reads: Sequence[Sequence[str]]) -> None:
    """Write a merged group's tensors (in the writing thread), then drop the pages of `reads`: the inputs of
    outputs that are views of them (none for the others: their inputs were dropped once merged)."""
    for k, t in outputs:
        writer.write(k, t)
    outputs.clear()
    _release(dirs, reads)


def _release(dirs: Sequence[ModelDir], reads: Sequence[Sequence[str]]) -> None:
    for d, names in zip(dirs, reads):
        d.release(names)


def _unfinished(writes: List[Tuple[Future, int]]) -> List[Tuple[Future, int]]:
    """The writes not done yet; a failed one raises its error."""
    left = []
    for w, n in writes:
        if w.done():
            w.result()
        else:
            left.append((w, n))
    return left


def _join_threads(prefix: str) -> None:
    """Join the threads named `prefix`*: shutdown() joins only those its pool recorded, and a signal raised in the
    main thread just as `submit` had started a worker (a job may run at once) leaves that one unrecorded."""
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t is not threading.current_thread():
            t.join()


def _check_unchanged(dirs: Sequence[ModelDir]) -> None:
    for d in dirs:
        d.check_unchanged()


class Distributed:
    """torch.distributed when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on GPUs."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.dist = None
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                torch.cuda.set_device(device)  # NCCL's object collectives use the current device
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.dist = dist

    def broadcast(self, value):
        if self.dist is None:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, value) -> list:
        if self.dist is None:
            return [value]
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.dist is not None and self.dist.is_initialized():
            self.dist.destroy_process_group()


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full ({e.filename or 'writing the output'})"
    return f"{type(e).__name__}: {e}"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_MAX_MMAP_THRESHOLD = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit


def keep_freed_memory(budget: int) -> bool:
    """Let glibc's malloc keep freed blocks below 32 MiB for reuse, and up to the budget of free memory at the
    top of its heap, instead of returning them to the system: a group's outputs and temporaries are then
    allocated in pages already mapped, not faulted and zeroed again for every group (model_stock end to end,
    0.95B bf16: system time 3.5 → 2.5-2.9 s, wall ~10 % less, peak RSS not higher). False where malloc is not
    glibc's (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MAX_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, max(min(budget, 2**31 - 1), HEAP_MAX_MMAP_THRESHOLD)))


def run(cfg: MergeConfig, out_dir: str, opts: Options) -> None:
    """Merge as `cfg` says into `out_dir` (see the module docstring)."""
    out_dir = os.path.abspath(out_dir)
    keep_freed_memory(opts.memory_budget)
    with Signals() as signals:
        dist = Distributed(opts.device)
        try:
            _run(cfg, out_dir, opts, dist, signals)
        finally:
            dist.close()
    if signals.late:
        print(f"fusedmerge: {signals.late} arrived once the merged model was in {out_dir}; the merge was finished",
              file=sys.stderr)


def _run(cfg: MergeConfig, out_dir: str, opts: Options, dist: Distributed, signals: Signals) -> None:
    """Rank 0 checks OUT_DIR, cleans up after killed runs into it and creates the workspace, which only it
    removes; every rank learns of a refusal (none waits forever)."""
    work, refused = None, None
    if dist.rank == 0:
        try:
            refuse_inputs(out_dir, cfg.paths())
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)  # as mergekit creates OUT_DIR's parents
            clean_stale(out_dir)
            _prepare_out_dir(out_dir, opts.overwrite)
            work = Workspace(out_dir)
        except OSError as e:
            refused = str(e)
    try:
        tmp, refused = dist.broadcast((work.tmp if work else None, refused))
        if refused:
            raise FileExistsError(refused)
        _merge(cfg, out_dir, opts, dist, tmp, lambda: work.replace(signals, opts.overwrite))
    finally:
        if work is not None:
            work.close()


def _merge(cfg: MergeConfig, out_dir: str, opts: Options, dist: Distributed, tmp: str, finish) -> None:
    """Every rank opens, checks and merges its part; errors are gathered (so no rank waits for one that
    left), and rank 0 completes the directory only when every rank succeeded."""
    dirs: List[ModelDir] = []
    error, done = None, None
    try:
        try:
            for path in cfg.paths():
                dirs.append(ModelDir(path))
            done = _merge_dirs(cfg, opts, dist, tmp, dirs)
        except Exception as e:  # noqa: BLE001 — every rank must reach the gather below
            error = (_describe(e), isinstance(e, ConfigError))  # a configuration that does not fit the models
        errors = [e for e in dist.all_gather(error) if e]
        if errors:
            kind = ConfigError if all(bad_config for _, bad_config in errors) else RuntimeError
            raise kind("merge failed, nothing was written to " + out_dir + ":\n  " + "\n  ".join(e for e, _ in errors))
        if dist.rank == 0:
            reference, plan, layers = done
            write_index(tmp, plan)
            copy_model_files(reference.path, tmp)
            write_config(tmp, cfg, layers)
            write_model_card(tmp, cfg, plan)
            finish()
    finally:
        for d in dirs:
            d.close()


def _merge_dirs(cfg: MergeConfig, opts: Options, dist: Distributed, tmp: str, dirs: List[ModelDir]):
    """Check the architectures, plan the output tensors and the shards, merge this rank's; returns (reference
    model, shard plan, output layer count or None)."""
    reference = dirs[0]
    if not cfg.layered:  # each model named as the configuration does (karcher's base_model is one more input)
        _check_architectures(reference, [(src.where, m) for src, m in zip(cfg.slices[0].sources, dirs)
                                         if m is not reference])
    check_config(reference.path)
    if cfg.tokenizer_source == "base":
        check_same_vocabulary(dirs)
    targets = Plan(cfg, dirs)
    keys = [t.name for t in targets.targets]
    plan = ShardPlan([(k, targets.dtype(k), targets.shape(k)) for k in keys], cfg.shard_size, dist.world)
    if cfg.spec.whole_model:
        if dist.world > 1:
            raise ValueError(f"{cfg.method} merges models one after another over the whole model; run it with one "
                             "process")
        from .opcm_stream import merge_opcm
        merge_opcm(cfg, dirs[0], dirs[1:], plan, tmp, opts)
    else:
        _stream(targets, dirs, plan, tmp, opts, dist.rank)
    return reference, plan, targets.layers


def _stream(targets: Plan, dirs: List[ModelDir], plan: ShardPlan, tmp: str, opts: Options, rank: int) -> None:
    """This rank's groups in turn on this thread; a prefetch thread maps the inputs of group i + 2 while group
    i + 1 is merged, and a writing thread writes group i meanwhile (disk time: checkpoint/shard_file.py). A
    group's inputs are dropped as soon as it is merged, so memory holds the group being merged, the next
    group's inputs and the outputs being written; where that would exceed the budget, the prefetch waits for
    the writes."""
    mine = plan.keys_of(rank)
    in_bytes, out_bytes = {k: targets.nbytes(k) for k in mine}, {k: plan.nbytes(k) for k in mine}
    cost = {k: in_bytes[k] + out_bytes[k] for k in mine}
    limit = max(opts.memory_budget // 2, 1)
    groups = _groups(mine, cost, limit)
    blocks = targets.cfg.spec.blocks
    blocked = {i for i, g in enumerate(groups) if blocks is not None and cost[g[0]] > limit}
    reads = lambda i: [[] for _ in dirs] if i in blocked else targets.reads(groups[i])  # noqa: E731
    held = lambda i, what: 0 if i >= len(groups) or i in blocked else sum(what[k] for k in groups[i])  # noqa: E731
    writer = ShardWriter(plan, tmp, rank, opts.memory_budget, opts.direct_io)
    progress = Progress(len(mine), sum(out_bytes.values()), opts.progress, rank)
    names = f"fusedmerge-{os.getpid()}-{id(writer):x}"
    prefetch, writing = ThreadPoolExecutor(1, names + "-prefetch"), ThreadPoolExecutor(1, names + "-write")
    try:
        touched = {j: prefetch.submit(_touch, dirs, reads(j)) for j in range(min(2, len(groups)))}
        writes: List[Tuple[Future, int]] = []  # (job, bytes it holds)
        for i, group in enumerate(groups):
            touched.pop(i).result()
            writes = _unfinished(writes)
            _check_unchanged(dirs)
            if i in blocked:  # one tensor over the limit: in row blocks (checkpoint/blocks.py)
                for w, _ in writes:  # the shard's earlier tensors first
                    w.result()
                writes = []
                k = group[0]
                sources = [(dirs[d], name) for d, name in targets.by_name[k].sources]
                call = lambda tensors: targets.block_call(k, tensors, opts.backend)  # noqa: E731
                dtype, shape = plan.entries[k]
                writer.write_blocks(k, merge_tensor(k, blocks, sources, shape, dtype, limit, opts.device, call,
                                                    targets.cfg.spec.merge), shape)
            else:
                merged = {}
                for call in targets.calls(group, opts.device, opts.backend):  # one per parameter signature
                    merged.update(targets.cfg.spec.merge(call))
                    del call
                outputs = [(k, merged.pop(k).to("cpu")) for k in group]
                if any(d.maps(t) for _, t in outputs for d in dirs):  # views of inputs: dropped once written
                    writes.append((writing.submit(_write_group, writer, outputs, dirs, reads(i)), held(i, cost)))
                else:
                    _release(dirs, reads(i))
                    writes.append((writing.submit(_write_group, writer, outputs, (), ()), held(i, out_bytes)))
                del outputs
            if i + 2 < len(groups):
                pending = sum(n for _, n in writes)
                wait = [w for w, _ in writes] if pending + held(i + 1, cost) + held(i + 2, in_bytes) > \
                    opts.memory_budget else []
                touched[i + 2] = prefetch.submit(_touch, dirs, reads(i + 2), wait)
            progress.update(len(group), sum(out_bytes[k] for k in group))
            _check_unchanged(dirs)
        for w, _ in writes:
            w.result()
        writing.shutdown()
        prefetch.shutdown()
    except BaseException:  # a failure or a signal (even while waiting above): jobs not yet started are dropped,
        writing.shutdown(wait=True, cancel_futures=True)  # and no thread runs on once this returns
        prefetch.shutdown(wait=True, cancel_futures=True)
        _join_threads(names)
        writer.close(failed=True)
        raise
    writer.close()
