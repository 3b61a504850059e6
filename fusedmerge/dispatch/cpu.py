"""C++ CPU backend: one OpenMP launch for a whole table of tensors (csrc/cpu/combine_cpu.cpp, ties_cpu.cpp)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _cpu
from ..reference import CombineJob, TiesSpec
from ._table import build_table


def combine(jobs: Sequence[CombineJob]) -> None:
    table, keep = build_table(jobs)
    _cpu.combine(table.data_ptr(), len(jobs), len(jobs[0].inputs))
    del keep


def ties(jobs: Sequence[CombineJob], spec: TiesSpec) -> None:
    """Selection of the trim thresholds (skipped for DARE-TIES), then one fused merge pass."""
    n = len(spec.weights)
    keys = spec.keys or [None] * len(jobs)
    rows = [CombineJob(j.out, j.inputs, spec.weights, j.base, spec.drop_threshold, k) for j, k in zip(jobs, keys)]
    table, keep = build_table(rows)
    model_scope = spec.scope == "model"
    thresholds = torch.zeros((len(spec.ks), n), dtype=torch.int32)
    if spec.drop_threshold == 0:
        ks = torch.tensor(spec.ks, dtype=torch.int64)
        _cpu.ties_select(table.data_ptr(), len(jobs), n, model_scope, ks.data_ptr(), thresholds.data_ptr())
    _cpu.ties_merge(table.data_ptr(), len(jobs), n, thresholds.data_ptr(), model_scope, spec.elect == "count",
                    spec.weighted_vote, ("sum", "mean", "max").index(spec.merge), spec.scaling, spec.drop_rescale,
                    spec.vote_tie == "majority")
    del keep


def l1_buckets(jobs: Sequence[CombineJob]) -> torch.Tensor:
    """reference.l1_buckets_reference of every job, stacked: [jobs, N, 2, 256] int64."""
    table, keep = build_table(jobs)
    buckets = torch.zeros((len(jobs), len(jobs[0].inputs), 2, 256), dtype=torch.int64)
    _cpu.l1_buckets(table.data_ptr(), len(jobs), len(jobs[0].inputs), buckets.data_ptr())
    del keep
    return buckets
