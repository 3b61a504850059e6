"""Triton backend: one launch per accumulation dtype over a whole table of tensors
(fusedmerge/triton_kernels/combine.py). Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from ..reference import CombineJob
from ..triton_kernels import combine as kernels
from ._table import build_table


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def combine(jobs: Sequence[CombineJob]) -> None:
    for acc_f64 in (False, True):
        group = [j for j in jobs if (j.acc_dtype == torch.float64) == acc_f64]
        if group:
            _launch(group, acc_f64)


def _launch(jobs: Sequence[CombineJob], acc_f64: bool) -> None:
    device = jobs[0].out.device
    block = kernels.BLOCK_INTERPRETER if device.type == "cpu" else kernels.BLOCK
    table, keep = build_table(jobs)
    tiles = (table[:, 2] + block - 1) // block
    tile_tensor = torch.repeat_interleave(torch.arange(len(jobs), dtype=torch.int64), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    tile_start = (torch.arange(tile_tensor.numel(), dtype=torch.int64) - first[tile_tensor]) * block
    if tile_tensor.numel() == 0:
        return
    args = [t.to(device) for t in (table, tile_tensor, tile_start)]
    kernels.launch(*args, n_inputs=len(jobs[0].inputs), acc_f64=acc_f64, block=block)
    del keep
