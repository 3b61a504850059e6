"""C++ CPU backend: one OpenMP launch for a whole table of tensors (csrc/cpu/combine_cpu.cpp, ties_cpu.cpp)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _cpu
from ..reference import CombineJob, TiesSpec
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
    elif spec.drop_threshold == 0:
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
