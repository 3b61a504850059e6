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
    """One key of a merge configuration: its kind ("number", "bool", "fraction" in (0, 1], "kept": a kept fraction
    in (0, 1] where more is 1 (mergekit's densities: ≥ 1 keeps every entry), "choice") and
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
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string; mergekit's pydantic takes it as a number
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {shown}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {shown}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond every float
            finite = False
        if not finite:
            raise ConfigError(f"{where} must be finite, got {shown}")
        if self.kind == "fraction" and not 0 < value <= 1:
            raise ConfigError(f"{where} is a fraction and must be in (0, 1], got {value}")
        if self.kind == "kept" and not 0 < value:
            raise ConfigError(f"{where} is the kept fraction and must be above 0 (1 or more keeps every entry), got {value}")
        return min(float(value), 1.0) if self.kind == "kept" else float(value)


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

    def block(self) -> Tuple[str, Optional[torch.Tensor], List[torch.Tensor]]:
        """(name, base, inputs) of a call holding one tensor's row block (RowBlocks)."""
        (name,) = self.models[0]
        return name, None if self.base is None else self.base[name], [m[name] for m in self.models]


@dataclass(frozen=True)
class Span:
    """A row block of one tensor: elements [first, first + numel) of the flattened tensor of `shape`. The
    block's tensors in a GroupCall are 1-D views of that range, keyed by the tensor's name."""

    shape: Tuple[int, ...]
    first: int
    numel: int


@dataclass(frozen=True)
class BlockPass:
    """One statistics pass of a blocked merge, over every block of the tensor in order.

    partial(call, span, stats): the statistics of one block (stats: what the earlier passes gave, None in
        the first pass).
    combine(total, partial): folds the next block's partial into the running total, in block order (the
        first block's partial is the first total), so that memory holds one total, not one per block.
    finish(total, stats): the tensor's statistics from the total (and the earlier passes'): exactly (bit for
        bit) what the whole tensor gives, or within a bound the method documents and tests.
    """

    partial: Callable[[GroupCall, Span, Any], Any]
    combine: Callable[[Any, Any], Any]
    finish: Callable[[Any, Any], Any] = lambda total, stats: total


@dataclass(frozen=True)
class RowBlocks:
    """How a method merges one tensor in blocks, so that memory does not grow with the largest tensor
    (`fusedmerge merge` streams a tensor larger than half its budget this way: checkpoint/blocks.py).

    passes:  statistics passes, run in order over every block before the merge (none: blocks independent).
    merge:   merge(call, span, stats) -> {name: the block's merged elements} given the last pass's combined
             statistics; None: ConfigMethod.merge on the block (elementwise methods without statistics).
    align:   align(shape, call) -> every block but the last has a multiple of this many elements and starts
             at a multiple of it (DARE's Philox groups: 128; rows for per-row statistics; a peer's chunks);
             `call` carries the parameters only (no tensors).
    Merging every block must give the whole tensor's result bit for bit (tests/test_blocks.py checks it).
    """

    passes: Tuple[BlockPass, ...] = ()
    merge: Optional[Callable[[GroupCall, Span, Any], StateDict]] = None
    align: Callable[[Tuple[int, ...], GroupCall], int] = lambda shape, call: 1


ELEMENTWISE = RowBlocks()  # each output element depends on the inputs' same element only


@dataclass(frozen=True)
class ConfigMethod:
    """A `merge_method:` of a configuration file. `peer="mergekit"` means mergekit has a method of this name
    with these keys, which fusedmerge carries out with mergekit's conventions (and the mergekit plugin
    registers); `peer=None` is fusedmerge's own. `merge` maps one group onto the Python API;
    `whole_model` methods (OPCM) see the whole model at once instead and have `merge` None. `check` refuses,
    when the configuration is read, what the method cannot carry out (it gets each non-base model's
    parameters). `batch` is the mergekit plugin's entry for mergekit's batched methods (linear, slerp):
    (tensors shaped [rows, ...], base index, mergekit's parameters) -> merged rows. `blocks`: how one
    tensor is merged in row blocks (RowBlocks); None: a tensor is always merged whole. `base_use`, for a
    method that does not need a base: None refuses a `base_model`; "optional" merges with it when one is
    given (mergekit's OPTIONAL base: nuslerp, multislerp); "input" takes it as one more model (mergekit's
    IGNORED base: karcher). `result_dtype(dtype)`: the dtype of the method's result for inputs of `dtype`
    where it is not `dtype` (arcee_fusion: fp32 for 16-bit models); the output's unless `out_dtype:` is given."""

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
    blocks: Optional[RowBlocks] = None
    base_use: Optional[str] = None
    result_dtype: Callable[[torch.dtype], torch.dtype] = lambda dtype: dtype


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
