"""OPCM on CLIP ViT-B/32 and ViT-L/14, 8 tasks: time per step and peak memory of the fused ContinualMerger
against the reference (FusionBench's loop, one full SVD per matrix per step), same device, same run.

Each benchmark round is one step (adding one model); the next model is generated in the round's setup,
outside the timing. The first step (no projection) is not timed; the second is the one whose peak extra
memory is recorded. The fused merger runs all 8 tasks; the reference, whose steps cost the same whatever
the step, is timed on fewer steps to keep the run short. Issue target: ≥ 5× on this CPU, ≥ 20× on a GPU.
"""

import pytest
from workloads import DEVICE, peak_extra_memory

from fusedmerge.opcm import ContinualMerger, looks_linear, opcm_reference
from fusedmerge.perf import sync
from fusedmerge.synthetic import clip_vit_base, clip_vit_finetuned

TASKS = 8
REFERENCE_STEPS = {"B/32": 3, "L/14": 2}


def _model(base, i):
    return {k: v.to(DEVICE) for k, v in clip_vit_finetuned(base, i).items()}


class Fused:
    def __init__(self, base):
        self.merger = ContinualMerger(base)

    def step(self, model):
        self.merger.add(model)


class Reference:
    def __init__(self, base):
        self.pending = []
        self.steps = opcm_reference(base, self._feed(), 0.5, projectable=lambda k: looks_linear(k, base[k]))

    def _feed(self):
        while self.pending:
            yield self.pending.pop()

    def step(self, model):
        self.pending.append(model)
        next(self.steps)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("model", ["B/32", "L/14"])
def test_opcm_step(benchmark, model, impl):
    cpu_base = clip_vit_base(model)
    base = {k: v.to(DEVICE) for k, v in cpu_base.items()}
    runner = (Fused if impl == "fused" else Reference)(base)
    runner.step(_model(cpu_base, 0))
    index = [1]

    def next_model():
        m = _model(cpu_base, index[0])
        index[0] += 1
        return (m,), {}

    def step(m):
        runner.step(m)
        sync(DEVICE)

    (first,), _ = next_model()
    peak = peak_extra_memory(lambda m=first: step(m))
    del first
    rounds = TASKS - 2 if impl == "fused" else REFERENCE_STEPS[model]
    benchmark.group = f"opcm {model} {TASKS} tasks fp32"
    benchmark.extra_info.update(op=f"opcm_{impl}", model=model, tasks=TASKS, device=str(DEVICE),
                                peak_extra_mb=round(peak / 2**20), per="step")
    benchmark.pedantic(step, setup=next_model, rounds=rounds, warmup_rounds=0, iterations=1)
