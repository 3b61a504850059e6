"""One tensor merged in row blocks, so that peak memory follows the budget and not the largest tensor.

`fusedmerge merge` sends here a tensor whose inputs and output take more than half the memory budget when
its method declares `ConfigMethod.blocks` (methods/_spec.py RowBlocks). The flattened tensor is cut into
consecutive spans of whole `align` units, each as large as the budget allows; every statistics pass reads
every span in order (its pages dropped once read), then the merge pass merges and writes span after span.
A block is read straight from the memory-mapped inputs, so only its own pages are ever resident.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

from ..methods._spec import GroupCall, RowBlocks, Span
from .model_dir import ModelDir
from .safetensors import element_size


def spans(shape: Sequence[int], per_element: int, limit: int, align: int) -> List[Span]:
    """Consecutive spans of the flattened tensor of `shape`: each a multiple of `align` elements (the last
    one what remains), as many as `limit` bytes hold at `per_element` bytes, at least one unit."""
    total = math.prod(shape)
    align = max(int(align), 1)
    step = max(limit // max(per_element, 1) // align, 1) * align
    return [Span(tuple(shape), first, min(step, total - first)) for first in range(0, total, step)]


def block_bytes(in_sizes: Sequence[int], out_size: int) -> int:
    """Bytes a block holds per element: the inputs', the output's (its own dtype, which may be wider than the
    inputs'), and an fp32 working copy of each input."""
    return sum(in_sizes) + out_size + 4 * len(in_sizes)


def block_stats(blocks: RowBlocks, parts: Sequence[Span], call_of: Callable[[Span], GroupCall],
                release: Callable[[Span], None] = lambda span: None):
    """The statistics of the last pass of `blocks` (None without passes): each pass reads every span in order
    (call_of(span): the GroupCall of a block; release(span) once it is read)."""
    stats = None
    for p in blocks.passes:
        total = None
        for span in parts:
            partial = p.partial(call_of(span), span, stats)
            total = partial if total is None else p.combine(total, partial)
            release(span)
        stats = p.finish(total, stats)
    return stats


def merge_tensor(key: str, blocks: RowBlocks, sources: Sequence[Tuple[ModelDir, str]], shape: Sequence[int],
                 out_dtype: torch.dtype, limit: int, device: torch.device,
                 make_call: Callable[[List[torch.Tensor]], GroupCall],
                 whole_merge: Callable[[GroupCall], dict]) -> Iterator[torch.Tensor]:
    """The merged tensor `key` of `out_dtype`, block after block (CPU tensors of its flattened elements).
    sources: its source tensors as (model directory, tensor name), the base's first; make_call(tensors)
    builds the GroupCall of one block of each source (Plan.block_call); whole_merge is ConfigMethod.merge."""
    sizes = [d.nbytes(name) // max(math.prod(shape), 1) for d, name in sources]
    per_element = block_bytes(sizes, element_size(out_dtype))
    parts = spans(shape, per_element, limit, blocks.align(tuple(shape), make_call([])))

    def call_of(span: Span) -> GroupCall:
        return make_call([d.tensor(name).reshape(-1)[span.first:span.first + span.numel].to(device)
                          for d, name in sources])

    def release(span: Span) -> None:
        for (d, name), size in zip(sources, sizes):
            d.release_bytes(name, span.first * size, (span.first + span.numel) * size)

    stats = block_stats(blocks, parts, call_of, release)
    for span in parts:
        call = call_of(span)
        merged = blocks.merge(call, span, stats) if blocks.merge is not None else whole_merge(call)
        del call
        out = merged.pop(key).to("cpu")
        release(span)
        yield out
