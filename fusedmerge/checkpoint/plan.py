"""What each output tensor is made of, planned as mergekit 0.1.5's MergePlanner plans it (mergekit/plan.py):
its source tensors (model, name) and its parameters resolved from the configuration's settings.

`models:`: every tensor of the reference model (the base, else the first model) from the same name in each
model; t = layer/(layers-1) for the tensors of layer `layer` where a gradient asks for it, 0 elsewhere.
`slices:`: the embedding from the first slice's sources, then each slice's layers renumbered consecutively
(layer `first + k` of every source gives output layer `L + k`, t = k/(length-1), or 1 for a one-layer slice),
then the other non-layer tensors (final norm, lm_head) from the last slice's sources; t = 0 for the non-layer
tensors. Shared parameters resolve from the slice's then the top-level settings on the output name; per-model
ones from the model's (source's) settings first, on the source tensor's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..methods import REQUIRED, GroupCall
from ..options import ConfigError
from .architecture import PRE_WEIGHTS, layer_name, layer_of, require_layers
from .config import MergeConfig, Slice, Source
from .model_dir import ModelDir
from .params import resolve

Items = Tuple[Tuple[str, Any], ...]


@dataclass(frozen=True)
class Target:
    """One output tensor: its sources as (model index in MergeConfig.paths(), tensor name), the base's first
    when it has one, and its resolved parameters (shared; given per-model ones, per non-base model)."""

    name: str
    sources: Tuple[Tuple[int, str], ...]
    has_base: bool
    shared: Items
    per_model: Tuple[Items, ...]

    @property
    def signature(self):
        """Tensors of one signature merge in one call (GroupCall carries one set of parameters)."""
        return self.has_base, len(self.sources), self.shared, self.per_model


class Plan:
    """The output tensors in order (`targets`), their dtypes and shapes, the output layer count."""

    def __init__(self, cfg: MergeConfig, dirs: Sequence[ModelDir]):
        self.cfg, self.dirs = cfg, list(dirs)
        paths = cfg.paths()
        self.slot = {id(src): (paths.index(src.path) if cfg.layered else i)
                     for s in cfg.slices for i, src in enumerate(s.sources)}
        why = cfg.uses_layers()
        if why:
            for p in cfg.paths():
                require_layers(p, why)
        self.targets: List[Target] = []
        self.layers: Optional[int] = None
        if cfg.layered:
            self._plan_slices()
        else:
            self._plan_models(bool(why))
        self._check_methods()
        self.by_name = {t.name: t for t in self.targets}

    def _dir(self, src: Source) -> ModelDir:
        return self.dirs[self.slot[id(src)]]

    def _plan_models(self, by_layer: bool) -> None:
        s = self.cfg.slices[0]
        names = list(self._dir(s.sources[0]).where)
        count = 1 + max((li[0] for li in map(layer_of, names) if li), default=-1) if by_layer else 0
        for name in names:
            li = layer_of(name) if by_layer else None
            t = 0.0 if li is None else (li[0] / (count - 1) if count > 1 else 1.0)
            self._add(s, name, [name] * len(s.sources), t)

    def _plan_slices(self) -> None:
        first, last = self.cfg.slices[0], self.cfg.slices[-1]
        names = [n for n in self._dir(first.sources[0]).where if layer_of(n) is None]
        for name in (n for n in names if n in PRE_WEIGHTS):
            self._add(first, name, [name] * len(first.sources), 0.0)
        out = 0
        for s in self.cfg.slices:
            lead = s.sources[0]
            lead_names = list(self._dir(lead).where)
            for k in range(s.length):
                t = k / (s.length - 1) if s.length > 1 else 1.0
                rests = [li[1] for li in map(layer_of, lead_names) if li and li[0] == lead.layers[0] + k]
                if not rests:
                    raise ConfigError(f"{lead.where}.layer_range {list(lead.layers)}: {lead.path} has no layer "
                                      f"{lead.layers[0] + k}")
                for rest in rests:
                    self._add(s, layer_name(out + k, rest), [layer_name(src.layers[0] + k, rest) for src in s.sources], t)
            out += s.length
        self.layers = out
        lasts = [n for n in self._dir(last.sources[0]).where if layer_of(n) is None and n not in PRE_WEIGHTS]
        for name in lasts:
            self._add(last, name, [name] * len(last.sources), 0.0)

    def _add(self, s: Slice, name: str, source_names: List[str], t: float) -> None:
        """Plan output tensor `name` of slice `s` from the sources' tensors `source_names` at gradient t."""
        shapes = set()
        for src, sname in zip(s.sources, source_names):
            d = self._dir(src)
            if sname not in d.where:
                raise ConfigError(f"{src.where}: {src.path} has no tensor {sname} (needed for {name})")
            shapes.add(d.entry(sname)[1])
        if len(shapes) > 1:
            raise ConfigError(f"{s.where}: the sources of {name} differ in shape: {sorted(shapes)}")
        spec, cfg = self.cfg.spec, self.cfg
        top = ("parameters", cfg.params)
        mid = (f"{s.where}.parameters", s.params)
        shared = []
        for key, p in spec.global_params.items():
            value, where = resolve(key, [mid, top], name, t)
            if value is None and p.default is REQUIRED:
                raise ConfigError(f"{spec.name} needs parameters.{key} for {name}: no setting gives it a value")
            if value is not None:
                shared.append((key, p.check(value, f"{where} for {name}")))
        per_model = []
        for src, sname in zip(s.models, source_names[len(s.sources) - len(s.models):]):
            given = []
            for key, p in spec.model_params.items():
                value, where = resolve(key, [(f"{src.where}.parameters", src.params), mid, top], sname, t)
                if value is None and p.default is REQUIRED:
                    raise ConfigError(f"{src.where}: {spec.name} needs a {key} for {src.path} ({sname}): no setting "
                                      "gives it a value (mergekit requires it too)")
                if value is not None:
                    given.append((key, p.check(value, f"{where} for {sname}")))
            per_model.append(tuple(given))
        sources = tuple((self.slot[id(src)], n) for src, n in zip(s.sources, source_names))
        self.targets.append(Target(name, sources, s.base is not None, tuple(shared), tuple(per_model)))

    def _check_methods(self) -> None:
        """The method's own check (model count, one DARE density) on each resolved set of parameters."""
        if self.cfg.spec.check is None:
            return
        seen = set()
        for t in self.targets:
            if t.per_model not in seen:
                seen.add(t.per_model)
                try:
                    self.cfg.spec.check([dict(m) for m in t.per_model])
                except ConfigError as e:
                    raise ConfigError(f"{e} (for {t.name})") from None

    def dtype(self, name: str) -> torch.dtype:
        """The output dtype: MergeConfig.result_dtype of the sources' promoted dtype for floating tensors, else that."""
        entries = [self.dirs[i].entry(n)[0] for i, n in self.by_name[name].sources]
        dtype = entries[0]
        for d in entries[1:]:
            dtype = torch.promote_types(dtype, d) if dtype.is_floating_point else dtype
        return self.cfg.result_dtype(dtype) if dtype.is_floating_point else dtype

    def shape(self, name: str) -> Tuple[int, ...]:
        i, n = self.by_name[name].sources[0]
        return self.dirs[i].entry(n)[1]

    def reads(self, names: Sequence[str]) -> List[List[str]]:
        """The source tensors of output tensors `names`, per model directory."""
        out: List[List[str]] = [[] for _ in self.dirs]
        for name in names:
            for i, n in self.by_name[name].sources:
                out[i].append(n)
        return out

    def nbytes(self, name: str) -> int:
        """The memory output tensor `name`'s inputs take: as stored, plus their copies where `dtype:` converts them."""
        total = 0
        for i, n in self.by_name[name].sources:
            dtype, shape = self.dirs[i].entry(n)[:2]
            merged_as = self.cfg.input_dtype(dtype)
            total += self.dirs[i].nbytes(n) + (0 if merged_as == dtype else math.prod(shape) * merged_as.itemsize)
        return total

    def calls(self, names: Sequence[str], device, backend: str) -> List[GroupCall]:
        """The merges of output tensors `names`: one GroupCall per parameter signature (inputs loaded onto
        `device`, keyed by output name)."""
        groups: Dict[Any, List[Target]] = {}
        for name in names:
            t = self.by_name[name]
            groups.setdefault(t.signature, []).append(t)
        calls = []
        for targets in groups.values():
            sources = range(len(targets[0].sources))
            sds = [{t.name: self.dirs[t.sources[j][0]].tensor(t.sources[j][1]).to(device) for t in targets}
                   for j in sources]
            calls.append(self._call(targets[0], sds, backend))
        return calls

    def block_call(self, name: str, tensors: Sequence[torch.Tensor], backend: str) -> GroupCall:
        """The GroupCall that calls() builds for output tensor `name`, on `tensors` (a row block of each of its
        sources, in order; none: the parameters only, for RowBlocks.align)."""
        return self._call(self.by_name[name], [{name: x} for x in tensors], backend)

    def _call(self, t: Target, sds: List[Dict[str, torch.Tensor]], backend: str) -> GroupCall:
        """A GroupCall with `t`'s parameters on state dicts `sds` (one per source, the base's first)."""
        has_base = t.has_base and bool(sds)
        cfg = self.cfg
        out_dtype = cfg.result_dtype(cfg.in_dtype) if cfg.out_dtype is not None else None
        sds = [{k: x.to(cfg.input_dtype(x.dtype)) for k, x in sd.items()} for sd in sds]
        given = [dict(m) for m in t.per_model]
        return GroupCall(sds[0] if has_base else None, sds[1:] if has_base else sds,
                         [m.get("weight", 1.0) for m in given], [m.get("density") for m in given],
                         dict(t.shared), self.cfg.seed, out_dtype, backend, per_model=tuple(given))


def updated_config(config: Mapping[str, Any], cfg: MergeConfig, layers: Optional[int]) -> Dict[str, Any]:
    """The output config.json as mergekit writes it: the layer count of a slices merge, the output dtype."""
    out = dict(config)
    if layers is not None:
        out["num_hidden_layers"] = layers
    if cfg.out_dtype is not None:
        key = "dtype" if "dtype" in out and "torch_dtype" not in out else "torch_dtype"
        out[key] = str(cfg.out_dtype).replace("torch.", "")
    return out
