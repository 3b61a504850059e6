"""C++ CPU backend: one OpenMP launch for a whole table of tensors (csrc/cpu/combine_cpu.cpp, ties_cpu.cpp)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _cpu
from ..reductions import DotsJob, DotsSpec, run_chunked
from ..reference import CombineJob, RankJob, TiesSpec, UniformsJob
from ._table import MERGE_CODES, build_table


def _table_args(table: torch.Tensor, n_inputs: int):
    return _cpu.TableArgs(table=table.data_ptr(), n_tensors=table.shape[0], n_inputs=n_inputs)


def combine(jobs: Sequence[CombineJob]) -> None:
    table, keep = build_table(jobs)
    _cpu.combine(_table_args(table, len(jobs[0].inputs)))
    del keep


def ties(jobs: Sequence[CombineJob], spec: TiesSpec) -> None:
    """Selection of the trim thresholds (skipped for DARE-TIES), then one fused merge pass."""
    n = len(spec.weights)
    keys = spec.keys or [None] * len(jobs)
    rows = [CombineJob(j.out, j.inputs, spec.weights, j.base, spec.drop_threshold, k, j.first)
            for j, k in zip(jobs, keys)]
    table, keep = build_table(rows)
    args = _table_args(table, n)
    model_scope = spec.scope == "model"
    thresholds = torch.zeros((len(spec.ks), n), dtype=torch.int32)
    if spec.thresholds is not None:
        thresholds = torch.tensor(spec.thresholds, dtype=torch.int64).to(torch.int32)
    elif spec.trims(jobs):
        ks = torch.tensor(spec.ks, dtype=torch.int64)
        _cpu.ties_select(_cpu.TiesSelectArgs(table=args, model_scope=model_scope, ks=ks.data_ptr(),
                                             thresholds=thresholds.data_ptr()))
    _cpu.ties_merge(_cpu.TiesMergeArgs(
        table=args, thresholds=thresholds.data_ptr(), model_scope=model_scope, elect_count=spec.elect == "count",
        weighted_vote=bool(spec.weighted_vote), merge=_cpu.MergeMode(MERGE_CODES[spec.merge]),
        scaling=float(spec.scaling), drop_rescale=float(spec.drop_rescale), majority_tie=spec.vote_tie == "majority"))
    del keep


def l1_buckets(jobs: Sequence[CombineJob]) -> torch.Tensor:
    """reference.l1_buckets_reference of every job, stacked: [jobs, N, 2, 256] int64."""
    table, keep = build_table(jobs)
    buckets = torch.zeros((len(jobs), len(jobs[0].inputs), 2, 256), dtype=torch.int64)
    _cpu.l1_buckets(_table_args(table, len(jobs[0].inputs)), buckets=buckets.data_ptr())
    del keep
    return buckets


def select(jobs: Sequence[CombineJob], spec: TiesSpec) -> torch.Tensor:
    """reference.select_reference: the k-th largest |x − b| bits per (scope, model), int64 [scopes, N]."""
    table, keep = build_table(jobs)
    thresholds = torch.zeros((len(spec.ks), len(jobs[0].inputs)), dtype=torch.int32)
    ks = torch.tensor(spec.ks, dtype=torch.int64)
    _cpu.ties_select(_cpu.TiesSelectArgs(table=_table_args(table, len(jobs[0].inputs)),
                                         model_scope=spec.scope == "model", ks=ks.data_ptr(),
                                         thresholds=thresholds.data_ptr()))
    del keep
    return thresholds.to(torch.int64) & 0xFFFFFFFF


def row_rank(jobs: Sequence[RankJob]) -> None:
    """reference.row_rank: per-row magnitude ranks (csrc/cpu/rank_cpu.cpp), one OpenMP launch per tensor."""
    for job in jobs:
        rows, n = job.values.shape
        _cpu.row_rank(_cpu.RowRankArgs(values=job.values.data_ptr(), rows=rows, n=n, out=job.out.data_ptr()))


def uniforms(jobs: Sequence[UniformsJob]) -> None:
    """reference.uniforms: each element's Philox uniform (csrc/cpu/rank_cpu.cpp), OpenMP over groups."""
    for job in jobs:
        _cpu.uniforms(key=job.key, numel=job.out.numel(), out=job.out.data_ptr(), first=job.first)


def dots(jobs: Sequence[DotsJob], spec: DotsSpec):
    """reductions.dots_reference's sums: one OpenMP launch per accumulation dtype writes each chunk's tree sums."""

    def launch(group, chunks, pairs, partials, acc_f64, chunk):
        table, keep = build_table([j.as_combine() for j in group])
        _cpu.dots(_cpu.DotsArgs(table=_table_args(table, len(group[0].inputs)), chunks=chunks.data_ptr(),
                                n_chunks=chunks.shape[0], pairs=pairs.data_ptr(), n_pairs=pairs.shape[0],
                                partials=partials.data_ptr()))
        del keep

    return run_chunked(jobs, spec, _cpu.DOTS_CHUNK, launch)
