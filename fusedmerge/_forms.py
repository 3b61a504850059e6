"""Input forms shared by every op: a sequence of tensors, of state dicts or of nn.Modules.

Everything is brought to a list of state dicts, checked (same keys, shapes, devices), merged key by key
through one multi-tensor launch, and handed back in the form it came in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import dispatch, options
from .reference import CombineJob

StateDict = Dict[str, torch.Tensor]


@dataclass
class Forms:
    """Inputs as state dicts, and how to give the result back."""

    kind: str  # "tensor", "state_dict" or "module"
    dicts: List[StateDict]
    first: object
    name: str = "tensor"

    def wrap(self, merged: StateDict, out=None):
        if out is not None:
            return out
        if self.kind == "tensor":
            return merged[self.name]
        if self.kind == "module":
            return module_with_state(self.first, merged)
        return merged


def module_with_state(like: nn.Module, state: StateDict) -> nn.Module:
    """A copy of the module `like` holding the tensors of `state` (assigned, not copied)."""
    module = copy.deepcopy(like)
    module.load_state_dict(state, assign=True)
    return module


def _kind(x) -> Optional[str]:
    if isinstance(x, torch.Tensor):
        return "tensor"
    if isinstance(x, nn.Module):
        return "module"
    if isinstance(x, Mapping):
        return "state_dict"
    return None


def _as_dict(x, kind: str, name: str, what: str) -> StateDict:
    if kind == "tensor":
        return {name: x}
    d = x.state_dict() if kind == "module" else x
    for key, value in d.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return dict(d)


def gather(inputs, arg: str = "inputs", name: str = "tensor") -> Forms:
    """Bring a sequence of tensors, state dicts or modules to state dicts; tensors get the key `name`."""
    if _kind(inputs) is not None or isinstance(inputs, (str, bytes)):
        raise TypeError(f"{arg} must be a sequence of tensors, state dicts or modules, "
                        f"got a single {type(inputs).__name__}")
    try:
        items = list(inputs)
    except TypeError:
        raise TypeError(f"{arg} must be a sequence of tensors, state dicts or modules, "
                        f"got {type(inputs).__name__}") from None
    if not items:
        raise ValueError(f"{arg} is empty: give at least one tensor, state dict or module")
    kinds = [_kind(x) for x in items]
    if kinds[0] is None or any(k != kinds[0] for k in kinds):
        found = sorted({type(x).__name__ for x in items})
        raise TypeError(f"{arg} must all be tensors, all state dicts or all modules, got {found}")
    dicts = [_as_dict(x, kinds[0], name, f"{arg}[{i}]") for i, x in enumerate(items)]
    return Forms(kinds[0], dicts, items[0], name)


def gather_like(base, forms: Forms, arg: str) -> StateDict:
    """Another model (the base, or `out`) in the same form as the inputs."""
    kind = _kind(base)
    if kind != forms.kind:
        raise TypeError(f"{arg} must be a {forms.kind.replace('_', ' ')} like the inputs, got {type(base).__name__}")
    return _as_dict(base, kind, forms.name, arg)


def check_keys(ref: StateDict, others: Sequence[Tuple[str, StateDict]], ref_label: str) -> None:
    """Every other dict has exactly the keys of `ref`; the error lists (some of) the missing and extra ones."""
    for label, d in others:
        missing = [k for k in ref if k not in d]
        extra = [k for k in d if k not in ref]
        if missing or extra:
            raise ValueError(f"{label} does not have the keys of {ref_label}: missing {missing[:8]}"
                             f"{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                             f"{'...' if len(extra) > 8 else ''}")


def check_key(key: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
    """The tensors of one key agree in shape, device and kind (floating or not); complex is refused."""
    t0 = tensors[0]
    for t, label in zip(tensors[1:], labels[1:]):
        if t.shape != t0.shape:
            raise ValueError(f"key {key!r}: shape {tuple(t.shape)} in {label} differs from {tuple(t0.shape)} in {labels[0]}")
        if t.device != t0.device:
            raise ValueError(f"key {key!r}: device {t.device} in {label} differs from {t0.device} in {labels[0]}")
        if t.is_floating_point() != t0.is_floating_point():
            raise ValueError(f"key {key!r}: {label} is {t.dtype} but {labels[0]} is {t0.dtype}; "
                             "floating and integer tensors cannot be merged together")
    if t0.is_complex():
        raise TypeError(f"key {key!r}: complex tensors are not supported")


def _agreed(key: str, tensors: Sequence[torch.Tensor], labels: Sequence[str]) -> torch.Tensor:
    """Integer and bool tensors (buffers) are not averaged: taken when every model agrees."""
    for t, label in zip(tensors[1:], labels[1:]):
        if t.dtype != tensors[0].dtype or not torch.equal(t, tensors[0]):
            raise ValueError(f"key {key!r}: {tensors[0].dtype} tensors are not merged and {label} differs from "
                             f"{labels[0]}; make them equal or remove the key before merging")
    return tensors[0].clone()


def _span(t: torch.Tensor):
    """The bytes a tensor can touch, strides included (views are not always contiguous)."""
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check_out(key: str, out: torch.Tensor, like: torch.Tensor, sources: Sequence[torch.Tensor], out_dtype) -> None:
    """`out` must fit the result and may alias an input only exactly (same memory, same dtype)."""
    if out.shape != like.shape or out.device != like.device:
        raise ValueError(f"key {key!r}: out is {tuple(out.shape)} on {out.device}, "
                         f"the result is {tuple(like.shape)} on {like.device}")
    if like.is_floating_point():
        if not out.is_floating_point() or (out_dtype is not None and out.dtype != out_dtype):
            raise TypeError(f"key {key!r}: out has dtype {out.dtype}, expected {out_dtype or 'a floating dtype'}")
        if not out.is_contiguous():
            raise ValueError(f"key {key!r}: out tensors must be contiguous")
    lo, hi = _span(out)
    for t in sources:
        if t.device != out.device or out.numel() == 0 or t.numel() == 0:
            continue
        t_lo, t_hi = _span(t)
        exact = t_lo == lo and t.dtype == out.dtype and t.is_contiguous()
        if t_lo < hi and lo < t_hi and not exact:
            raise ValueError(f"key {key!r}: out partially overlaps an input; "
                             "it may only be one of the inputs itself or separate memory")


@dataclass
class Terms:
    """How one key's inputs enter the combination: coefficients, and the drop threshold and Philox keys."""

    coeffs: Sequence[float]
    threshold: int = 0
    keys: Optional[Sequence[int]] = None
    first: int = 0  # a row block's first element in its whole tensor (the Philox counters start there)


@dataclass
class Slot:
    """One floating key to merge: where the result goes, and the tensors it is made of."""

    key: str
    out: torch.Tensor
    inputs: List[torch.Tensor]
    base: Optional[torch.Tensor]


def prepare(forms: Forms, base: Optional[StateDict], out_dtype, out: Optional[StateDict] = None,
            arg: str = "inputs") -> Tuple[StateDict, List[Slot]]:
    """Check every key first (nothing is written when anything is wrong), then allocate the results (or take
    them from `out`) and settle integer buffers. Returns the result dict and the floating keys to merge."""
    options.out_dtype(out_dtype)
    others = [(f"{arg}[{i}]", d) for i, d in enumerate(forms.dicts)][1:]
    others += [(label, d) for label, d in (("base", base), ("out", out)) if d is not None]
    check_keys(forms.dicts[0], others, f"{arg}[0]")
    labels = [f"{arg}[{i}]" for i in range(len(forms.dicts))] + (["base"] if base is not None else [])
    agreed: StateDict = {}
    for key in forms.dicts[0]:
        xs = [d[key] for d in forms.dicts]
        everything = xs + ([base[key]] if base is not None else [])
        check_key(key, everything, labels)
        if out is not None:
            _check_out(key, out[key], xs[0], everything, out_dtype)
        if not xs[0].is_floating_point():
            agreed[key] = _agreed(key, everything, labels)
    merged: StateDict = {}
    slots: List[Slot] = []
    for key in forms.dicts[0]:
        xs = [d[key] for d in forms.dicts]
        b = base[key] if base is not None else None
        if key in agreed:
            merged[key] = out[key].copy_(agreed[key]) if out is not None else agreed[key]
            continue
        if out is not None:
            merged[key] = out[key]
        else:
            dtype = out_dtype
            if dtype is None:
                for t in xs + ([b] if b is not None else []):
                    dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
            merged[key] = torch.empty(xs[0].shape, dtype=dtype, device=xs[0].device)
        slots.append(Slot(key, merged[key], xs, b))
    return merged, slots


@torch.no_grad()
def merge_linear(forms: Forms, terms: Union[Sequence[float], Callable[[List["Slot"]], List[Terms]]],
                 base: Optional[StateDict], out_dtype, backend: str, out: Optional[StateDict] = None,
                 arg: str = "coefficients") -> StateDict:
    """Every floating key becomes one job of a single multi-tensor launch; see reference.combine_reference.
    `terms` is one list of coefficients for every key, or a function of the keys to merge (Slots) giving
    each one's Terms; `arg` names the user's argument they come from, for the refusal of a coefficient that
    is not finite in the accumulation dtype. With `out`, results are written into its tensors (which may be
    the inputs' own, as in an in-place merge)."""
    merged, slots = prepare(forms, base, out_dtype, out)
    all_terms = terms(slots) if callable(terms) else [Terms(list(terms))] * len(slots)
    jobs: Dict[torch.device, List[CombineJob]] = {}
    for slot, t in zip(slots, all_terms):
        job = CombineJob(slot.out, slot.inputs, t.coeffs, slot.base, t.threshold, t.keys, t.first)
        if slot.out.numel():
            options.finite_coefficients(job.coeffs, job.acc_dtype, arg)
        jobs.setdefault(slot.out.device, []).append(job)
    for device_jobs in jobs.values():
        dispatch.run("combine", device_jobs, backend)
    return merged
