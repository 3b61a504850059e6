"""Option checks shared by every method: each returns the value in its canonical form or raises a
TypeError/ValueError that names the argument. Options classes call them in ``__post_init__``, so an option
object that exists is valid.

``option(default, op=...)`` declares a dataclass field together with its type in the torch custom op
(``fusedmerge.torch_ops`` builds each op's signature from the fields that have one).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any, List, Optional, Sequence, Tuple

import torch


class ConfigError(ValueError):
    """A merge configuration fusedmerge cannot carry out as written."""


NO_OP = object()  # the field has no parameter in the torch custom op


def option(default: Any = dataclasses.MISSING, *, op: Any = NO_OP, doc: str = ""):
    """A field of a frozen options dataclass; `op` is its annotation in the torch custom op."""
    return dataclasses.field(default=default, metadata={"op": op, "doc": doc})


def real(value, arg: str) -> float:
    """A finite real number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a real number, got {value!r}") from None
    except OverflowError:
        raise ValueError(f"{arg} must be finite, got an integer beyond the float range") from None
    if not math.isfinite(value):
        raise ValueError(f"{arg} must be finite, got {value}")
    return value


def boolean(value, arg: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be True or False, got {value!r}")
    return value


def integer(value, arg: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{arg} must be an int, got {value!r}")
    return value


def text(value, arg: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be a string, got {value!r}")
    return value


def choice(value, arg: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {arg} {value!r}; choose one of {tuple(choices)}")
    return value


def drop_probability(value, arg: str = "p") -> float:
    """p in [0, 1): the probability of dropping a delta."""
    p = real(value, arg)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{arg} is the drop probability and must be in [0, 1), got {p}"
                         + (" (p = 1 would drop every delta)" if p == 1.0 else ""))
    return p


def kept_fraction(value, arg: str = "density") -> float:
    """A kept fraction in (0, 1]."""
    d = real(value, arg)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"{arg} is the kept fraction and must be in (0, 1], got {d}")
    return d


def numbers(value, arg: str) -> Tuple[float, ...]:
    """A sequence (or 1-D tensor) of real numbers, as a tuple of floats (finiteness checked by the caller)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    try:
        return tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise TypeError(f"{arg} must be a sequence of numbers, got {value!r}") from None
    except OverflowError:
        raise ValueError(f"{arg} must be finite, got an integer beyond the float range") from None


def optional_numbers(value, arg: str) -> Optional[Tuple[float, ...]]:
    return None if value is None else numbers(value, arg)


def count_weights(weights: Optional[Sequence[float]], n: int, normalise: bool, arg: str = "weights") -> List[float]:
    """One weight per input (1 by default), finite; normalised to sum 1 when asked."""
    if weights is None:
        w = [1.0] * n
    else:
        w = list(numbers(weights, arg))
        if len(w) != n:
            raise ValueError(f"{arg} has {len(w)} entries but there are {n} inputs")
        if not all(math.isfinite(x) for x in w):
            raise ValueError(f"{arg} must be finite, got {w}")
    if normalise:
        total = math.fsum(w)
        if total == 0.0:
            raise ValueError(f"{arg} sum to zero and cannot be normalised: {w}")
        w = [x / total for x in w]
    return w


def finite_coefficients(coeffs: Sequence[float], acc_dtype: torch.dtype, arg: str, name: str = "",
                        tensors: Sequence[torch.Tensor] = ()) -> None:
    """Refuse coefficients that are not finite once rounded to the accumulation dtype (fp32 or fp64): they
    would turn the result into inf or NaN (inf·0) silently. `arg` names the user's argument(s); coefficients
    computed from `tensors` (the merge of key `name`) are blamed on those where they hold NaN or Inf."""
    for i, c in enumerate(coeffs):
        try:
            finite = math.isfinite(c) and (acc_dtype == torch.float64 or bool(struct.pack("<f", float(c))))
        except OverflowError:  # struct refuses exactly the values that round to ±inf in fp32
            finite = False
        if not finite and not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError(f"{name}: its tensors hold NaN or Inf values, and this method's coefficients, computed "
                             "from them (norms, angles, variances), are not finite")
        if not finite:
            raise ValueError(f"{arg}: the coefficient of input {i} is {c!r}, which is not finite in {acc_dtype} "
                             "(the accumulation dtype); it would make the result inf or NaN")


def out_dtype(value) -> Optional[torch.dtype]:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype or None, got {value!r}")
    return value


def canonical(options, **fields) -> None:
    """Set checked values on a frozen dataclass from its __post_init__."""
    for name, value in fields.items():
        object.__setattr__(options, name, value)


def op_parameters(options_cls) -> List[Tuple[str, Any, Any]]:
    """(name, annotation, default) of the fields that a torch custom op exposes, in field order."""
    out = []
    for f in dataclasses.fields(options_cls):
        if f.metadata.get("op", NO_OP) is not NO_OP:
            out.append((f.name, f.metadata["op"], f.default))
    return out
