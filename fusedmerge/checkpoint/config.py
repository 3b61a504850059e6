"""Merge configurations: mergekit 0.1.5's YAML schema for the methods fusedmerge implements, plus its own keys.

    merge_method: NAME                   (fusedmerge.methods.CONFIG_METHODS: `fusedmerge merge --help` lists them)
    base_model: PATH                     (every method but linear and passthrough)
    models:                              (in order: OPCM merges them in this order)
      - model: PATH
        parameters: {weight: 1.0, density: 0.5}
    slices:                              (instead of models: layers stacked from layer ranges)
      - sources: [{model: PATH, layer_range: [0, 16], parameters: {...}}, ...]
        parameters: {...}
    parameters: {lambda: 1.0, normalize: ..., rescale: true, int8_mask: ..., alpha: 0.5, variant: fusionbench}
    dtype: bfloat16                      (output dtype, but see ConfigMethod.result_dtype; out_dtype wins)
    tokenizer_source: base               (the base's tokenizer files; other tokenizer keys are refused)
    seed: 0                              (fusedmerge: DARE masks are keyed by seed and tensor name)
    fusedmerge: {shard_size: 2GB}        (fusedmerge's own options)

Which keys a method takes, per model and shared, their kinds and defaults are declared by the method's
module (ConfigMethod); mergekit's conventions hold for mergekit's methods. A parameter's value is a scalar,
a gradient list or {filter, value} entries at any level (checked here, resolved per output tensor by
plan.py with params.py). Anything else (unknown keys, tokenizer surgery, LoRA and hub references, other
methods) is refused, never ignored.
"""
from __future__ import annotations

import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..methods import CONFIG_METHODS, REQUIRED, ConfigMethod
from ..options import ConfigError
from .params import check_setting, is_scalar, uses_layers

METHODS = tuple(CONFIG_METHODS)
TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "seed", "fusedmerge",
            "tokenizer_source", "tokenizer", "chat_template", "modules"}
FUSEDMERGE_KEYS = {"shard_size"}
MAX_SIZE = 2**63  # bytes
MAX_TEXT, MAX_NODES = 1 << 20, 10_000  # a configuration's characters, and its YAML nodes with aliases expanded
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


_BASE_NOTE = {None: ", no base_model", "optional": ", base_model optional", "input": ", a base_model is one more model"}


def describe_methods() -> str:
    """The methods a configuration may name, with their keys (for --help)."""
    lines = []
    for c in CONFIG_METHODS.values():
        peer = f"mergekit's {c.name}" if c.peer == "mergekit" else "fusedmerge's own"
        show = lambda k, p: f"{k} (required)" if p.default is REQUIRED else f"{k}={p.default}"  # noqa: E731
        keys = ", ".join(show(k, p) for k, p in c.model_params.items()) or "none"
        glob = ", ".join(show(k, p) for k, p in c.global_params.items()) or "none"
        lines.append(f"{c.name} ({peer}{_BASE_NOTE[c.base_use] if not c.needs_base else ''}): {c.doc}; "
                     f"per model: {keys}; parameters: {glob}" + ("" if c.whole_model else
                     f"; tensors over half the budget: {'in row blocks' if c.blocks else 'whole'}"))
    return "\n".join(lines) + "\n\n" + LANGUAGE


LANGUAGE = ("models: or slices: (sources with layer_range, layers renumbered); a parameter is a scalar, a gradient "
            "list over a slice's layers, or [{filter: SUBSTRING, value: ...}]; precedence: source > slice > top "
            "level (per-model keys at any level, the others at slice or top level; opcm: models: and scalars "
            "only); tokenizer_source: base only")


@dataclass
class Source:
    """A model as an input of a slice: its directory, the layers it gives (None: the whole model, as under
    `models:`) and its own parameter settings (params.check_setting)."""

    path: str
    layers: Optional[Tuple[int, int]] = None
    params: Dict[str, Any] = field(default_factory=dict)
    where: str = "models"


@dataclass
class Slice:
    """An output slice: its base (None for methods without one), the other models in order, its settings."""

    base: Optional[Source]
    models: List[Source]
    params: Dict[str, Any] = field(default_factory=dict)
    where: str = "models"

    @property
    def sources(self) -> List[Source]:
        return ([self.base] if self.base else []) + self.models

    @property
    def length(self) -> int:
        first = self.sources[0].layers
        return first[1] - first[0] if first else 0


@dataclass
class MergeConfig:
    method: str
    slices: List[Slice]
    base: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    out_dtype: Optional[torch.dtype] = None  # out_dtype:, else dtype: (config.json's torch_dtype, as mergekit's)
    cast: bool = False  # out_dtype: given: every floating tensor is cast to it (mergekit's SaveTensor)
    in_dtype: Optional[torch.dtype] = None  # dtype: (mergekit loads the inputs in it)
    seed: int = 0
    shard_size: int = 2 << 30
    text: str = ""
    layered: bool = False  # `slices:` (layers planned from layer_range) rather than `models:`
    tokenizer_source: Optional[str] = None

    @property
    def spec(self) -> ConfigMethod:
        return CONFIG_METHODS[self.method]

    def paths(self) -> List[str]:
        """The model directories the configuration reads, the base first: each listed model of `models:`
        (OPCM may list one twice), each model of `slices:` once."""
        if not self.layered:
            return [src.path for src in self.slices[0].sources]
        out = [self.base] if self.base else []
        for s in self.slices:
            out += [src.path for src in s.sources if src.path not in out]
        return out

    def result_dtype(self, inputs: torch.dtype) -> torch.dtype:
        """A floating output tensor's dtype for inputs of (promoted) dtype `inputs`: mergekit's `out_dtype:`
        when given, else the method's result for inputs of `dtype:` (mergekit casts the inputs to it) or of
        their own dtype (arcee_fusion: fp32 for 16-bit inputs; every other method: that dtype)."""
        if self.cast:
            return self.out_dtype
        return self.spec.result_dtype(self.in_dtype or inputs)

    def input_dtype(self, stored: torch.dtype) -> torch.dtype:
        """The dtype an input tensor stored as `stored` is merged from, as mergekit loads the inputs in `dtype:`:
        fp32 models merged as bfloat16 are rounded to bf16 first, and `dtype: float64` widens every input so that
        the kernels accumulate in fp64 as mergekit computes; otherwise the stored dtype (widening to fp32 changes
        no value: the kernels accumulate in fp32 or fp64 anyway)."""
        if self.in_dtype is None or not stored.is_floating_point:
            return stored
        narrower = torch.promote_types(stored, self.in_dtype) != self.in_dtype
        return self.in_dtype if narrower or self.in_dtype == torch.float64 else stored

    def param(self, key: str):
        """A global parameter, or the method's default for it (whole-model methods take scalars only)."""
        return self.params.get(key, self.spec.global_params[key].default)

    def uses_layers(self) -> Optional[str]:
        """Why the configuration needs layer indices (None where it does not)."""
        if self.layered:
            return "slices:"
        scopes = [("parameters", self.params)] + [(f"{s.where}.parameters", s.params) for s in self.slices] \
            + [(f"{src.where}.parameters", src.params) for s in self.slices for src in s.sources]
        for where, scope in scopes:
            for k, v in scope.items():
                if uses_layers(v):
                    return f"the gradient list in {where}.{k}"
        return None


def show(value) -> str:
    """A value for a message: its repr, shortened."""
    return reprlib.repr(value)


def parse_size(text, where: str = "size") -> int:
    """'2GB', '512MiB', '1.5G', 1000000 → bytes; `where` names the key or option in errors."""
    refused = ConfigError(f"{where}: cannot read the size {show(text)}; write e.g. 512MB, 2GB or 1.5GiB "
                          "(at most 2**63 bytes)")
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        s = str(text).strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num):]
        try:
            value = float(num)
        except ValueError:
            raise refused from None
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}.get(unit)
    if scale is None or not 0 < value < MAX_SIZE or not math.isfinite(value * scale) or value * scale >= MAX_SIZE:
        raise refused
    return int(float(value) * scale)


def check_seed(seed, where: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise ConfigError(f"{where} must be a 64-bit integer, got {show(seed)}")
    return seed


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(map(show, set(keys) - set(allowed)))
    if extra:
        raise ConfigError(f"{where}: unsupported key(s) {', '.join(extra)}; supported: {sorted(allowed)}")


def _path(value, where: str, root: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model directory path, got {show(value)} (LoRA and hub models are not "
                          "supported)")
    if "+" in value:
        raise ConfigError(f"{where}: {value!r} looks like a model+LoRA reference, which fusedmerge does not apply; "
                          "merge the LoRA into its model first")
    path = value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))
    if not os.path.isdir(path) and value.count("/") == 1 and not value.startswith("."):
        raise ConfigError(f"{where}: {value!r} is not a local directory; fusedmerge reads local model directories "
                          "only (download the hub model first, e.g. with huggingface-cli download)")
    return path


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {show(value)}")
    return value


def _settings(raw, spec: ConfigMethod, where: str, shared: bool) -> Dict[str, Any]:
    """A scope's parameter settings, checked: the method's per-model keys anywhere, its shared keys only in
    the slice and top-level scopes (mergekit resolves them from there and would ignore them in a model's)."""
    raw = _mapping(raw, where)
    allowed = {**spec.model_params, **spec.global_params} if shared else spec.model_params
    misplaced = sorted(k for k in raw if k in spec.global_params and not shared)
    if misplaced:
        raise ConfigError(f"{where}.{misplaced[0]}: {misplaced[0]} is one value per tensor for all models; give it in "
                          "the slice's or the top-level parameters (mergekit ignores it in a model's)")
    _unknown(raw, allowed, f"{where} for {spec.name}")
    return {k: check_setting(v, allowed[k], f"{where}.{k}") for k, v in raw.items()}


def _source(item, where: str, spec: ConfigMethod, root: str, layered: bool) -> Source:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'model' key, got {show(item)}")
    _unknown(item, {"model", "parameters"} | ({"layer_range"} if layered else set()), where)
    layers = None
    if layered:
        lr = item.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr) and 0 <= lr[0] < lr[1]):
            raise ConfigError(f"{where}.layer_range must be [first, end) with 0 <= first < end, got {show(lr)}")
        layers = (lr[0], lr[1])
    return Source(_path(item.get("model"), f"{where}.model", root), layers,
                  _settings(item.get("parameters"), spec, f"{where}.parameters", False), where)


def _refuse_duplicates(spec: ConfigMethod, sources: List[Source]) -> None:
    """mergekit refuses a model given twice as one merge's inputs ("Duplicate merge inputs")."""
    seen = {}
    for src in sources:
        if spec.peer == "mergekit" and src.path in seen:
            raise ConfigError(f"{src.where}: {src.path} is already {seen[src.path]}; mergekit refuses duplicate merge "
                              "inputs, also of other layers (give the model once, with the weight you mean)")
        seen[src.path] = src.where


def _check_models(spec: ConfigMethod, s: Slice, params: Dict[str, Any]) -> None:
    """The method's own check (model count, densities) on the slice's models, with their parameters where
    every setting is a scalar (otherwise it runs again per tensor once the settings are resolved)."""
    scopes = [params, s.params]
    scalar = all(is_scalar(v) for scope in scopes + [m.params for m in s.models] for v in scope.values())
    per_model = [{k: v for scope in (params, s.params, m.params) for k, v in scope.items() if k in spec.model_params}
                 if scalar else {} for m in s.models]
    if spec.check is None:
        return
    try:
        spec.check(per_model)
    except ConfigError as e:
        raise ConfigError(f"{s.where}: {e}" if s.where != "models" else str(e)) from None


def _tokenizer(data: dict, base: Optional[str]) -> Optional[str]:
    """mergekit's tokenizer keys: `tokenizer_source: base` (the base's tokenizer files are copied); the
    tokenizer surgery (a union or another model's vocabulary, added tokens, chat templates) is refused."""
    if "tokenizer" in data:
        raise ConfigError("tokenizer: builds a new vocabulary and permutes the embedding rows to it (tokenizer "
                          "surgery), which fusedmerge does not do; use tokenizer_source: base or leave it out")
    if "chat_template" in data:
        raise ConfigError("chat_template: fusedmerge does not rewrite the tokenizer's chat template; leave it out and "
                          "edit tokenizer_config.json after the merge")
    source = data.get("tokenizer_source")
    if source is None:
        return None
    if source != "base":
        raise ConfigError(f"tokenizer_source: {show(source)} builds a new vocabulary and permutes the embedding rows to "
                          "it (tokenizer surgery), which fusedmerge does not do; only tokenizer_source: base is supported")
    if base is None:
        raise ConfigError("tokenizer_source: base needs a base_model")
    return source


def parse(data: Any, *, root: str = ".", text: str = "") -> MergeConfig:
    """A MergeConfig from the YAML document `data`; relative paths are taken from `root` (the working
    directory for files, as mergekit does)."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping with merge_method and models or slices")
    _unknown(data, TOP_KEYS, "configuration")
    if "modules" in data:
        raise ConfigError("modules: (per-module configurations of multimodal models) is not supported; use models: "
                          "or slices:")
    method = data.get("merge_method")
    if method is None:
        raise ConfigError(f"merge_method is missing; fusedmerge implements {list(METHODS)}")
    if not isinstance(method, str) or method not in CONFIG_METHODS:
        raise ConfigError(f"merge_method {show(method)} is not supported; fusedmerge implements {list(METHODS)}")
    spec = CONFIG_METHODS[method]
    if ("models" in data) == ("slices" in data):
        raise ConfigError("exactly one of models or slices must be given (mergekit's rule)")
    params = _settings(data.get("parameters"), spec, "parameters", True)
    base = data.get("base_model")
    if not spec.needs_base:
        if base is not None and spec.base_use is None:
            raise ConfigError(f"{method} takes no base_model (mergekit ignores it); list it under models instead")
    elif base is None and "models" in data:  # slices: each slice may name its own (_slices)
        raise ConfigError(f"{method} needs a base_model")
    base = _path(base, "base_model", root) if base is not None else None
    layered = "slices" in data
    slices = _slices(data["slices"], spec, base, root) if layered else [_models(data["models"], spec, base, root)]
    tokenizer_base = base
    if spec.base_use == "input":
        base = None  # one of the models now (mergekit's IGNORED base)
    for s in slices:
        _check_models(spec, s, params)
    given = [params] + [s.params for s in slices]
    missing = [k for k, p in spec.global_params.items() if p.default is REQUIRED and not any(k in g for g in given)]
    if missing:
        raise ConfigError(f"{method} needs parameters.{missing[0]}")
    cfg = MergeConfig(method, slices, base, params, text=text, layered=layered)
    if spec.whole_model:
        scopes = [("parameters", params)] + [(f"{m.where}.parameters", m.params) for s in slices for m in s.sources]
        bad = ["slices"] if layered else [f"{w}.{k}" for w, g in scopes for k, v in g.items() if not is_scalar(v)]
        if bad:
            raise ConfigError(f"{bad[0]}: {method} merges whole models one after another; it takes models: with "
                              "scalar parameters only (no slices, gradients or filters)")
    cfg.tokenizer_source = _tokenizer(data, tokenizer_base)
    for key in ("dtype", "out_dtype"):
        dtype = data.get(key)
        if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
            raise ConfigError(f"{key} {show(dtype)} is not supported; choose one of {sorted(DTYPES)}")
    cfg.in_dtype = DTYPES.get(data.get("dtype"))
    cfg.out_dtype = DTYPES.get(data.get("out_dtype")) or cfg.in_dtype
    cfg.cast = data.get("out_dtype") is not None
    cfg.seed = check_seed(data.get("seed", 0))
    own = _mapping(data.get("fusedmerge"), "fusedmerge")
    _unknown(own, FUSEDMERGE_KEYS, "fusedmerge")
    if "shard_size" in own:
        cfg.shard_size = parse_size(own["shard_size"], "fusedmerge.shard_size")
    return cfg


def _models(raw, spec: ConfigMethod, base: Optional[str], root: str) -> Slice:
    """`models:` as one slice of whole models. mergekit's methods take the base listed among the models as
    the base (its own parameters unused); fusedmerge's own (OPCM) merge every listed model."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    models = [_source(item, f"models[{i}]", spec, root, False) for i, item in enumerate(raw)]
    others = [m for m in models if m.path != base]
    _refuse_duplicates(spec, others)
    if spec.peer == "mergekit" and others:
        models = others
    if base and spec.base_use == "input":
        return Slice(None, [Source(base, where="base_model")] + others)
    return Slice(Source(base, where="base_model") if base else None, models)


def _slices(raw, spec: ConfigMethod, base: Optional[str], root: str) -> List[Slice]:
    """`slices:`, each a list of sources of equal layer counts; the base (slice's or top-level) must be one of
    each slice's sources, as mergekit requires."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices must be a non-empty list of {sources: [{model: PATH, layer_range: [a, b]}, ...]}")
    slices = []
    for i, item in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with 'sources', got {show(item)}")
        if "residual_weight" in item:
            raise ConfigError(f"{where}.residual_weight: mergekit 0.1.5 accepts it but never uses it; remove it")
        _unknown(item, {"sources", "base_model", "parameters"}, where)
        raw_sources = item.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise ConfigError(f"{where}.sources must be a non-empty list of {{model: PATH, layer_range: [a, b]}}")
        sources = [_source(s, f"{where}.sources[{j}]", spec, root, True) for j, s in enumerate(raw_sources)]
        _refuse_duplicates(spec, sources)
        if len({s.layers[1] - s.layers[0] for s in sources}) > 1:
            raise ConfigError(f"{where}: all sources of a slice must have the same number of layers, got "
                              f"{[list(s.layers) for s in sources]}")
        slice_base = item.get("base_model")
        if slice_base is not None and not spec.needs_base and spec.base_use is None:
            raise ConfigError(f"{where}.base_model: {spec.name} takes no base_model")
        slice_base = _path(slice_base, f"{where}.base_model", root) if slice_base is not None else base
        if spec.needs_base and slice_base is None:
            raise ConfigError(f"{where}: {spec.name} needs a base_model (at the top level or in the slice)")
        params = _settings(item.get("parameters"), spec, f"{where}.parameters", True)
        if slice_base is not None and spec.base_use == "input" and slice_base not in [s.path for s in sources]:
            raise ConfigError(f"{where}: the base model {slice_base} is one more input of {spec.name}; list it among "
                              "the slice's sources with its layer_range")
        if spec.needs_base or (slice_base is not None and spec.base_use == "optional"):
            found = [s for s in sources if s.path == slice_base]
            if len(found) != 1:
                raise ConfigError(f"{where}: the base model {slice_base} must be one of its sources (once), as "
                                  "mergekit requires")
            slices.append(Slice(found[0], [s for s in sources if s is not found[0]], params, where))
        else:
            slices.append(Slice(None, sources, params, where))
    return slices


def load(path: str) -> MergeConfig:
    """Read and check a YAML configuration file (bounded: see read_yaml)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TEXT + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the configuration ({getattr(e, 'strerror', None) or e})") from None
    return parse(read_yaml(text, path), root=os.getcwd(), text=text)


def read_yaml(text: str, what: str = "configuration"):
    """A YAML document, refused at once (before anything is built) when it is longer than MAX_TEXT
    characters, nests too deep, or has more than MAX_NODES nodes once its aliases are expanded (an alias
    bomb) or a recursive alias."""
    import yaml

    if len(text) > MAX_TEXT:
        raise ConfigError(f"{what}: longer than {MAX_TEXT} characters; a merge configuration is much smaller")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_nodes(node, what) > MAX_NODES:
            raise ConfigError(f"{what}: more than {MAX_NODES} YAML nodes once aliases are expanded; refused")
        return None if node is None else loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: not valid YAML ({e})") from None
    except (RecursionError, ValueError) as e:  # deep nesting; integers of more than 4300 digits
        raise ConfigError(f"{what}: cannot be read ({type(e).__name__}: {show(str(e))})") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node, what: str) -> None:
    if not isinstance(node.value, list) or not all(isinstance(pair, tuple) for pair in node.value):
        return  # not a mapping
    keys = [k.value for k, _ in node.value if isinstance(k.value, str) and k.value != "<<"]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"{what}: the key {twice[0]!r} is given twice in one mapping (line {node.start_mark.line + 1}); "
                          "YAML would keep only the last one")


def _expanded_nodes(root, what: str) -> int:
    """How many nodes the YAML graph at `root` has as a tree (aliases expanded), counted without
    expanding it; above MAX_NODES the count stops there. Raises ConfigError on a recursive alias, and on a
    mapping that gives one key twice (YAML readers, mergekit's too, keep the last value silently)."""
    sizes, path, stack = {}, set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        children = [n for pair in node.value for n in (pair if isinstance(pair, tuple) else (pair,))] \
            if isinstance(node.value, list) else []
        if done:
            path.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_NODES + 1)
        elif id(node) in path:
            raise ConfigError(f"{what}: a recursive YAML alias; refused")
        elif id(node) not in sizes:
            _refuse_duplicate_keys(node, what)
            path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return sizes[id(root)]
