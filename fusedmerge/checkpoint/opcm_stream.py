"""OPCM from the command line: models merged one after another with a ContinualMerger. Unlike the
tensor-by-tensor methods it holds its state for the whole model (the running sum in fp32, the task vector
being added and its projection), so the memory budget must cover about three fp32 copies of the model."""

from __future__ import annotations

from typing import List

from ..opcm import ContinualMerger
from .model_dir import ModelDir
from .output import ShardPlan, ShardWriter


def merge_opcm(cfg, base: ModelDir, models: List[ModelDir], plan: ShardPlan, directory: str, opts) -> None:
    keys = list(base.where)
    need = 3 * sum(4 * base.nbytes(k) // max(base.entry(k)[0].itemsize, 1) for k in keys)
    if need > opts.memory_budget:
        raise MemoryError(f"opcm holds its running sum and the task vector being added in fp32 "
                          f"(~{need / 1e9:.1f} GB for this model), more than the memory budget "
                          f"({opts.memory_budget / 1e9:.1f} GB); raise --memory-budget")
    load = lambda d: {k: d.tensor(k).to(opts.device) for k in keys}  # noqa: E731
    merger = ContinualMerger(load(base), cfg.param("alpha"), variant=cfg.param("variant"),
                             skip_nonleaf=cfg.param("skip_nonleaf"), backend=opts.backend)
    base.check_unchanged()
    for m in models:
        merger.add(load(m))
        m.check_unchanged()
        m.release(keys)
    merged = merger.merged(out_dtype=cfg.out_dtype)
    writer = ShardWriter(plan, directory, 0)
    try:
        for k in plan.keys_of(0):
            writer.write(k, merged.pop(k).to("cpu"))
    except BaseException:
        writer.close(failed=True)
        raise
    writer.close()
