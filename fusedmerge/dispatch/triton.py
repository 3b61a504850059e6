"""Triton backend: one launch per accumulation dtype over a whole table of tensors
(fusedmerge/triton_kernels/combine.py), and TIES (triton_kernels/ties.py). Runs on CUDA tensors, and on
CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

from typing import Sequence

import torch

from ..reductions import DotsJob, DotsSpec, run_chunked
from ..reference import CombineJob, RankJob, TiesSpec, UniformsJob
from ..triton_kernels import combine as kernels
from ..triton_kernels import dots as dots_kernels
from ..triton_kernels import rank as rank_kernels
from ..triton_kernels import ties as ties_kernels
from ._table import DTYPE_CODES, MERGE_CODES, NUMEL, build_table


def combine(jobs: Sequence[CombineJob]) -> None:
    for acc_f64 in (False, True):
        group = [j for j in jobs if (j.acc_dtype == torch.float64) == acc_f64]
        if group:
            _launch(group, acc_f64)


def _tiles(table: torch.Tensor, block: int, device):
    """Per tile: its row of the table and its first element (a multiple of 128), on `device`."""
    tiles = (table[:, NUMEL] + block - 1) // block
    tile_tensor = torch.repeat_interleave(torch.arange(table.shape[0], dtype=torch.int64), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    tile_start = (torch.arange(tile_tensor.numel(), dtype=torch.int64) - first[tile_tensor]) * block
    return tile_tensor.to(device), tile_start.to(device)


def _launch(jobs: Sequence[CombineJob], acc_f64: bool) -> None:
    device = jobs[0].out.device
    block = kernels.BLOCK_INTERPRETER if device.type == "cpu" else kernels.BLOCK
    table, keep = build_table(jobs)
    tile_tensor, tile_start = _tiles(table, block, device)
    if tile_tensor.numel() == 0:
        return
    kernels.launch(table.to(device), tile_tensor, tile_start, n_inputs=len(jobs[0].inputs), acc_f64=acc_f64,
                   block=block)
    del keep


def ties(jobs: Sequence[CombineJob], spec: TiesSpec) -> None:
    """Thresholds (skipped for DARE-TIES), then the majority vote if asked, then one merge launch."""
    device = jobs[0].out.device
    block = ties_kernels.BLOCK_INTERPRETER if device.type == "cpu" else ties_kernels.BLOCK
    keys = spec.keys or [None] * len(jobs)
    rows = [CombineJob(j.out, j.inputs, spec.weights, j.base, spec.drop_threshold, k, j.first)
            for j, k in zip(jobs, keys)]
    table, keep = build_table(rows)
    tile_tensor, tile_start = _tiles(table, block, device)
    table = table.to(device)
    thresholds = (torch.tensor(spec.thresholds, dtype=torch.int64) if spec.thresholds is not None
                  else ties_kernels.thresholds(jobs, spec) if spec.trims(jobs)
                  else torch.zeros((len(spec.ks), len(spec.weights)), dtype=torch.int64)).to(device)
    common = dict(n_inputs=len(spec.weights), model_scope=spec.scope == "model", weighted=spec.weighted_vote,
                  count=spec.elect == "count", rescale=float(spec.drop_rescale), block=block)
    tie_sign = 1.0
    if spec.vote_tie == "majority":
        sums = torch.zeros(tile_tensor.numel(), dtype=torch.int64, device=device)
        ties_kernels.launch_vote(table, tile_tensor, tile_start, thresholds, sums, **common)
        total = int(sums.sum())
        tie_sign = float((total > 0) - (total < 0))
    ties_kernels.launch_merge(table, tile_tensor, tile_start, thresholds, merge=MERGE_CODES[spec.merge],
                              scaling=float(spec.scaling), tie_sign=tie_sign, **common)
    del keep


def l1_buckets(jobs: Sequence[CombineJob]) -> torch.Tensor:
    """reference.l1_buckets_reference of every job, stacked: [jobs, N, 2, 256] int64 on the CPU."""
    device = jobs[0].out.device
    block = kernels.BLOCK_INTERPRETER if device.type == "cpu" else kernels.BLOCK
    table, keep = build_table(jobs)
    tile_tensor, tile_start = _tiles(table, block, device)
    buckets = torch.zeros((len(jobs), len(jobs[0].inputs), 2, 256), dtype=torch.int64, device=device)
    kernels.launch_l1_buckets(table.to(device), tile_tensor, tile_start, buckets, n_inputs=len(jobs[0].inputs),
                              block=block)
    del keep
    return buckets.cpu()


def select(jobs: Sequence[CombineJob], spec: TiesSpec) -> torch.Tensor:
    """reference.select_reference, by the TIES thresholds' radix select (torch.kthvalue on the device)."""
    return ties_kernels.thresholds(jobs, spec)


def row_rank(jobs: Sequence[RankJob]) -> None:
    """reference.row_rank: one program per row (triton_kernels/rank.py)."""
    for job in jobs:
        rank_kernels.launch(job.values, job.out)


def uniforms(jobs: Sequence[UniformsJob]) -> None:
    """reference.uniforms: both Philox streams of each element (triton_kernels/rank.py)."""
    for job in jobs:
        rank_kernels.launch_uniforms(job.key, job.out, job.first)


def dots(jobs: Sequence[DotsJob], spec: DotsSpec):
    """reductions.dots_reference's sums: one launch per input count and dtypes writes each chunk's tree sums."""
    device = jobs[0].device
    tile = dots_kernels.CHUNK_INTERPRETER if device.type == "cpu" else dots_kernels.CHUNK

    def launch(group, chunks, pairs, partials, acc_f64, chunk):
        table, keep = build_table([j.as_combine() for j in group])
        base = group[0].base
        dots_kernels.launch(table.to(device), chunks.to(device), pairs.to(device), partials,
                            n_inputs=len(group[0].inputs), in_dtype=DTYPE_CODES[group[0].inputs[0].dtype],
                            base_dtype=dots_kernels.NO_BASE if base is None else DTYPE_CODES[base.dtype],
                            acc_f64=acc_f64, chunk=chunk, tile=tile)
        del keep

    return run_chunked(jobs, spec, tile, launch)
