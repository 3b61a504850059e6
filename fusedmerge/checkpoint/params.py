"""Parameter settings of a merge configuration, resolved per output tensor as mergekit 0.1.5 resolves them
(mergekit/config.py::evaluate_setting, parameter_resolver.py::resolve_parameter).

A setting is one of
    0.5                                  a scalar
    [0, 0.5, 1]                          a gradient: piecewise linear in t = layer/(layers-1) within the slice
                                         (booleans and choices pick values[int(t·(n-1))] instead)
    [{filter: mlp, value: 0.3}, ...]     filters: the first entry whose filter is a substring of the tensor's
                                         name (an entry without filter, or '*', matches every tensor) gives
                                         the value, a scalar or a gradient; {filter, value} alone is one entry
Scopes are searched from the highest precedence down; a scope whose setting gives nothing for a tensor (no
filter matches, an empty list) passes on to the next one, as in mergekit.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

from ..methods import Param
from ..options import ConfigError

SCALARS = (bool, int, float, str)
show = reprlib.repr


@dataclass(frozen=True)
class Gradient:
    values: Tuple[Any, ...]


@dataclass(frozen=True)
class Filters:
    entries: Tuple[Tuple[Optional[str], Any], ...]  # (filter or None, scalar or Gradient)


def check_setting(value, param: Param, where: str):
    """The setting `value` of a parameter, each of its values checked by `param` (errors name `where`, the
    list position and the filter)."""
    if isinstance(value, dict):
        return Filters((_entry(value, param, where),))
    if isinstance(value, list):
        if value and all(isinstance(e, dict) for e in value):
            return Filters(tuple(_entry(e, param, f"{where}[{i}]") for i, e in enumerate(value)))
        if not all(isinstance(e, SCALARS) for e in value):
            raise ConfigError(f"{where}: a list must hold either values (a gradient) or {{filter, value}} entries, "
                              f"not both or anything else; got {show(value)}")
        return Gradient(tuple(param.check(e, f"{where}[{i}]") for i, e in enumerate(value)))
    return param.check(value, where)


def _entry(entry: dict, param: Param, where: str):
    extra = sorted(map(show, set(entry) - {"filter", "value"}))
    if extra or "value" not in entry:
        raise ConfigError(f"{where}: a filtered value is {{filter: SUBSTRING, value: ...}}; got {show(entry)}")
    name = entry.get("filter")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.filter must be a string (a substring of tensor names), got {show(name)}")
    value = entry["value"]
    where = f"{where}.value" + (f" (filter {name!r})" if name is not None else "")
    if isinstance(value, (dict, list)) and not (isinstance(value, list) and all(isinstance(e, SCALARS) for e in value)):
        raise ConfigError(f"{where}: a filtered value is a scalar or a gradient list, got {show(value)}")
    return name, check_setting(value, param, where)


def is_scalar(setting) -> bool:
    return not isinstance(setting, (Gradient, Filters))


def uses_layers(setting) -> bool:
    """Whether the setting's value depends on the layer index (a gradient somewhere in it)."""
    if isinstance(setting, Filters):
        return any(uses_layers(v) for _, v in setting.entries)
    return isinstance(setting, Gradient) and len(setting.values) > 1


def evaluate(setting, name: str, t: float):
    """The value of `setting` for tensor `name` at t, or None where it gives none (mergekit's rules)."""
    if isinstance(setting, Filters):
        for pattern, value in setting.entries:
            if pattern is None or pattern == "*" or (name and pattern in name):
                return evaluate(value, name, t)
        return None
    if isinstance(setting, Gradient):
        values = setting.values
        if not values:
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * values[i0] + frac * values[i1]
    return setting


def resolve(key: str, scopes: Sequence[Tuple[str, Optional[Mapping[str, Any]]]], name: str, t: float):
    """(value, where it was set) of `key` for tensor `name` from the first scope, highest precedence first,
    that gives one; (None, None) where none does."""
    for where, scope in scopes:
        if scope and key in scope:
            value = evaluate(scope[key], name, t)
            if value is not None:
                return value, f"{where}.{key}"
    return None, None
