"""fusedmerge's methods as torch custom ops (torch.library), with fake implementations, so that they can be
called inside ``torch.compile(fullgraph=True)`` code and pass ``torch.library.opcheck``.

One op per registered method with custom-op parameters (fusedmerge.methods.METHODS), its signature built
from the method's options dataclass (fields declared with an `op` type, in field order) plus its op
extras; ``print(torch.ops.fusedmerge.ties.default._schema)`` shows one. For example::

    torch.ops.fusedmerge.average(inputs, weights, out_dtype)
    torch.ops.fusedmerge.task_arithmetic(base, inputs, scaling, weights, out_dtype)
    torch.ops.fusedmerge.dare(base, inputs, p, scaling, weights, rescale, seed, name, linear_only, out_dtype,
                              l1_rescale)
    torch.ops.fusedmerge.ties(base, inputs, density, scaling, weights, merge, dare_p, seed, name, scope, ...)
    torch.ops.fusedmerge.opcm_project(merged, task, alpha, variant)                 (b, m, n) or (m, n)

Each is the Python function of the same name on tensors, so the results are the same bits; the result has
`out_dtype`, else the promoted dtype of the inputs (and base). Merging is not differentiable: no autograd
formula is registered.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import List

import torch
from torch import Tensor

from .methods import METHODS, Method
from .opcm.projection import project
from .options import op_parameters


def _result_like(first: Tensor, tensors, out_dtype) -> Tensor:
    """The result: integer tensors (taken when they agree) keep the inputs' dtype; floating ones get
    `out_dtype`, else the promoted dtype."""
    if not tensors[-1].is_floating_point():
        return first.new_empty(first.shape, dtype=tensors[-1].dtype)
    dtype = out_dtype
    if dtype is None:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return first.new_empty(first.shape, dtype=dtype)


def _register(method: Method):
    params = op_parameters(method.options) + list(method.op_extras)
    tensors = ["base", "inputs"] if method.takes_base else ["inputs"]
    signature = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a)
         for n, a in (("base", Tensor), ("inputs", List[Tensor]))[2 - len(tensors):]]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a,
                             default=inspect.Parameter.empty if d is dataclasses.MISSING else d) for n, a, d in params],
        return_annotation=Tensor)
    call = method.op_call or method.function

    def impl(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        heads = [values.pop(t) for t in tensors]
        return call(*heads, **values)

    def fake(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = bound.arguments["inputs"]
        first = bound.arguments.get("base", inputs[0])
        everything = ([bound.arguments["base"]] if method.takes_base else []) + list(inputs)
        return _result_like(first, everything, bound.arguments.get("out_dtype"))

    impl.__signature__ = fake.__signature__ = signature
    impl.__name__ = method.name
    impl.__doc__ = method.function.__doc__
    op = torch.library.custom_op(f"fusedmerge::{method.name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


OPS = {name: _register(m) for name, m in METHODS.items() if op_parameters(m.options) or m.op_extras}


@torch.library.custom_op("fusedmerge::opcm_project", mutates_args=())
def opcm_project(merged: Tensor, task: Tensor, alpha: float = 0.5, variant: str = "fusionbench") -> Tensor:
    return project(merged, task, alpha, variant=variant)


@opcm_project.register_fake
def _(merged, task, alpha=0.5, variant="fusionbench"):
    return task.new_empty(task.shape)
