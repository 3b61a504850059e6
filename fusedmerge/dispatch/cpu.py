"""C++ CPU backend: one OpenMP launch for a whole table of tensors (csrc/cpu/combine_cpu.cpp, ties_cpu.cpp)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .. import _cpu
from ..reductions import DotsJob, DotsSpec, check_pairs
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


def dots(jobs: Sequence[DotsJob], spec: DotsSpec) -> List[torch.Tensor]:
    """reductions.dots_reference's sums: one OpenMP launch per number of inputs writes each row's sums (the
    chunks' tree sums and each row's tree over them, in C++)."""
    check_pairs(jobs, spec)
    out: List[Optional[torch.Tensor]] = [None] * len(jobs)
    pairs = torch.tensor(spec.pairs, dtype=torch.int64)
    groups: Dict[int, List[int]] = {}
    for k, j in enumerate(jobs):
        groups.setdefault(len(j.inputs), []).append(k)
    for n_inputs, index in groups.items():
        rows = [jobs[k].rows for k in index]
        sums = torch.empty((sum(rows), len(spec.pairs)), dtype=torch.float64)
        table, keep = build_table([jobs[k].as_combine() for k in index])
        rows_t = torch.tensor(rows, dtype=torch.int64)
        _cpu.dots(_cpu.DotsArgs(table=_table_args(table, n_inputs), rows=rows_t.data_ptr(), pairs=pairs.data_ptr(),
                                n_pairs=len(spec.pairs), sums=sums.data_ptr()))
        del keep
        for k, s in zip(index, torch.split(sums, rows)):
            out[k] = s
    return out
