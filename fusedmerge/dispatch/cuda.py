"""CUDA backend: one launch for a whole table of tensors on the caller's current stream
(csrc/cuda/combine_cuda.cu). The table and the tile prefix travel as one pinned block."""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _cuda
from ..reference import CombineJob
from ._table import NUMEL, build_table


def combine(jobs: Sequence[CombineJob]) -> None:
    device = jobs[0].out.device
    table, keep = build_table(jobs)
    tiles = (table[:, NUMEL] + _cuda.TILE - 1) // _cuda.TILE
    first_tile = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(tiles, 0)])
    block = torch.cat([table.flatten(), first_tile]).pin_memory()
    with torch.cuda.device(device):
        dev_block = block.to(device, non_blocking=True)
        stream = torch.cuda.current_stream(device).cuda_stream
        args = _cuda.TableArgs(table=dev_block.data_ptr(), n_tensors=len(jobs), n_inputs=len(jobs[0].inputs))
        _cuda.combine(args, total_tiles=int(first_tile[-1]), stream=stream)
    # The caching allocator orders reuse of dev_block and the inputs' copies on this stream.
    del keep, dev_block
