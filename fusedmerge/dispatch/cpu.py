"""C++ CPU backend: one OpenMP launch for a whole table of tensors (csrc/cpu/combine_cpu.cpp)."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _cpu
from ..reference import CombineJob
from ._table import build_table


def combine(jobs: Sequence[CombineJob], coeffs: Sequence[float]) -> None:
    table, keep = build_table(jobs)
    coeff_t = torch.tensor(list(coeffs), dtype=torch.float64)
    _cpu.combine(table.data_ptr(), len(jobs), len(coeffs), coeff_t.data_ptr())
    del keep
