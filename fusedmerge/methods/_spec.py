"""What a merge method declares: its Python function and options, the reference that defines its result,
the kernel primitives it runs on, and how its peers spell it (mergekit YAML methods, FusionBench classes).
Everything that lists methods (the CLI's configuration checks and --help, the mergekit plugin, the
FusionBench classes, the torch custom ops, the generic backend test) reads these declarations."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..options import ConfigError

StateDict = Dict[str, torch.Tensor]
REQUIRED = object()  # a constructor argument without a default


@dataclass(frozen=True)
class Param:
    """One key of a merge configuration: its kind ("number", "bool", "fraction" in (0, 1], "choice") and
    default (REQUIRED: the configuration must give it)."""

    kind: str
    default: Any = None
    choices: Tuple[str, ...] = ()
    doc: str = ""

    def check(self, value, where: str):
        shown = reprlib.repr(value)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {shown}")
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise ConfigError(f"{where} must be one of {list(self.choices)}, got {shown}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {shown}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond every float
            finite = False
        if not finite:
            raise ConfigError(f"{where} must be finite, got {shown}")
        if self.kind == "fraction" and not 0 < value <= 1:
            raise ConfigError(f"{where} is the kept fraction and must be in (0, 1], got {value}")
        return float(value)


@dataclass(frozen=True)
class GroupCall:
    """One group of tensors to merge as a configuration says (the CLI streams a model in such groups; the
    mergekit plugin passes one tensor). weights/densities: one per model (None where not given); per_model:
    each model's per-model parameters as given (e.g. passthrough's scale)."""

    base: Optional[StateDict]
    models: List[StateDict]
    weights: List[float]
    densities: List[Optional[float]]
    params: Mapping[str, Any]
    seed: int = 0
    out_dtype: Optional[torch.dtype] = None
    backend: str = "auto"
    name: str = "tensor"
    per_model: Tuple[Mapping[str, Any], ...] = ()

    def param(self, key: str, method: "ConfigMethod"):
        value = self.params.get(key, method.global_params[key].default)
        if value is REQUIRED:
            raise ConfigError(f"{method.name} needs parameters.{key}")
        return value

    def model_values(self, key: str, method: "ConfigMethod") -> List[Any]:
        """Each model's value of the per-model parameter `key` (the method's default where not given)."""
        given = list(self.per_model) or [{}] * len(self.models)
        return [m.get(key, method.model_params[key].default) for m in given]


@dataclass(frozen=True)
class ConfigMethod:
    """A `merge_method:` of a configuration file. `peer="mergekit"` means mergekit has a method of this name
    with these keys, which fusedmerge carries out with mergekit's conventions (and the mergekit plugin
    registers); `peer=None` is fusedmerge's own. `merge` maps one group onto the Python API;
    `whole_model` methods (OPCM) see the whole model at once instead and have `merge` None. `check` refuses,
    when the configuration is read, what the method cannot carry out (it gets each non-base model's
    parameters). `batch` is the mergekit plugin's entry for mergekit's batched methods (linear, slerp):
    (tensors shaped [rows, ...], base index, mergekit's parameters) -> merged rows. `base_use`, for a method
    that does not need a base: None refuses a `base_model`; "optional" merges with it when one is given
    (mergekit's OPTIONAL base: nuslerp, multislerp); "input" takes it as one more model (mergekit's IGNORED
    base: karcher)."""

    name: str
    peer: Optional[str]
    needs_base: bool
    model_params: Mapping[str, Param]
    global_params: Mapping[str, Param]
    merge: Optional[Callable[[GroupCall], StateDict]] = None
    check: Optional[Callable[[List[Mapping[str, Any]]], None]] = None
    batch: Optional[Callable[[Sequence[torch.Tensor], Optional[int], Mapping[str, Any]], torch.Tensor]] = None
    whole_model: bool = False
    doc: str = ""
    base_use: Optional[str] = None


@dataclass(frozen=True)
class FusionBenchAlgorithm:
    """A FusionBench `BaseAlgorithm` counterpart: its class name here, the peer's class, its constructor
    arguments in order (name, default or REQUIRED), and `run(algorithm, pool)` where `algorithm` holds the
    arguments as attributes (and `backend`) and `pool` loads models (integrations.fusion_bench.Pool)."""

    name: str
    peer: str
    args: Tuple[Tuple[str, Any], ...]
    run: Callable[[Any, Any], Any]
    doc: str = ""


@dataclass(frozen=True)
class Method:
    """A merge method of the Python API.

    function:   the public function (fusedmerge.<name>), taking the inputs then keyword options
    options:    its frozen options dataclass (fields with an `op` type become custom-op parameters)
    reference:  the plain-torch function that defines its result (backend="torch" runs it)
    primitives: the kernel primitives it launches (fusedmerge.dispatch.PRIMITIVES)
    takes_base: the function's first argument is the base model
    n_inputs:   how many inputs it takes (None: any number)
    op_extras:  custom-op parameters beyond the options' own, as (name, annotation, default), and
    op_call:    how the op's arguments map onto `function` (None: passed through by name)
    grid:       option sets the generic backend test runs (small; every backend against the reference)
    """

    name: str
    function: Callable
    options: type
    reference: Callable
    primitives: Tuple[str, ...]
    takes_base: bool = True
    n_inputs: Optional[int] = None
    config: Tuple[ConfigMethod, ...] = ()
    fusionbench: Tuple[FusionBenchAlgorithm, ...] = ()
    op_extras: Tuple[Tuple[str, Any, Any], ...] = ()
    op_call: Optional[Callable[..., Any]] = None
    grid: Tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def call(self, base, inputs: Sequence, **options):
        """The function on (base,) inputs with `options`, whatever `takes_base`."""
        return self.function(base, inputs, **options) if self.takes_base else self.function(inputs, **options)
