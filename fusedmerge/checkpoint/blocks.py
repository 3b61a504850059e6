"""One tensor merged in row blocks, so that peak memory follows the budget and not the largest tensor.

`fusedmerge merge` sends here a tensor whose inputs and output take more than half the memory budget when
its method declares `ConfigMethod.blocks` (methods/_spec.py RowBlocks). The flattened tensor is cut into
consecutive spans of whole `align` units, each as large as the budget allows; every statistics pass reads
every span in order (its pages dropped once read), then the merge pass merges and writes span after span.
A block is read straight from the memory-mapped inputs, so only its own pages are ever resident.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, List, Sequence

import torch

from ..methods._spec import GroupCall, RowBlocks, Span
from .model_dir import ModelDir


def spans(shape: Sequence[int], per_element: int, limit: int, align: int) -> List[Span]:
    """Consecutive spans of the flattened tensor of `shape`: each a multiple of `align` elements (the last
    one what remains), as many as `limit` bytes hold at `per_element` bytes, at least one unit."""
    total = math.prod(shape)
    align = max(int(align), 1)
    step = max(limit // max(per_element, 1) // align, 1) * align
    return [Span(tuple(shape), first, min(step, total - first)) for first in range(0, total, step)]


def merge_tensor(key: str, blocks: RowBlocks, dirs: Sequence[ModelDir], has_base: bool, shape: Sequence[int],
                 limit: int, device: torch.device, make_call: Callable[[object, list], GroupCall],
                 whole_merge: Callable[[GroupCall], dict]) -> Iterator[torch.Tensor]:
    """The merged tensor `key`, block after block (CPU tensors of its flattened elements). make_call(base,
    models) builds a GroupCall from state dicts; whole_merge is ConfigMethod.merge."""
    sizes = [d.nbytes(key) // max(math.prod(shape), 1) for d in dirs]
    per_element = sum(sizes) + max(sizes) + 4 * len(dirs)  # inputs, output, fp32 working copies
    parts = spans(shape, per_element, limit, blocks.align(tuple(shape), make_call(None, [])))

    def call_of(span: Span) -> GroupCall:
        tensors = [{key: d.tensor(key).reshape(-1)[span.first:span.first + span.numel].to(device)} for d in dirs]
        return make_call(tensors[0] if has_base else None, tensors[1:] if has_base else tensors)

    def release(span: Span) -> None:
        for d, size in zip(dirs, sizes):
            d.release_bytes(key, span.first * size, (span.first + span.numel) * size)

    stats = None
    for p in blocks.passes:
        total = None
        for span in parts:
            partial = p.partial(call_of(span), span, stats)
            total = partial if total is None else p.combine(total, partial)
            release(span)
        stats = p.finish(total, stats)
    for span in parts:
        call = call_of(span)
        merged = blocks.merge(call, span, stats) if blocks.merge is not None else whole_merge(call)
        del call
        out = merged.pop(key).to("cpu")
        release(span)
        yield out
