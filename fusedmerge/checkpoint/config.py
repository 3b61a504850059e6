"""Merge configurations: mergekit's YAML schema for the methods fusedmerge implements, plus its own keys.

    merge_method: NAME                   (fusedmerge.methods.CONFIG_METHODS: `fusedmerge merge --help` lists them)
    base_model: PATH                     (every method but linear)
    models:                              (in order: OPCM merges them in this order)
      - model: PATH
        parameters: {weight: 1.0, density: 0.5}
    parameters: {lambda: 1.0, normalize: ..., rescale: true, int8_mask: ..., alpha: 0.5, variant: fusionbench}
    dtype: bfloat16                      (output dtype; mergekit's out_dtype wins when given)
    seed: 0                              (fusedmerge: DARE masks are keyed by seed and tensor name)
    fusedmerge: {shard_size: 2GB}        (fusedmerge's own options)

Which keys a method takes, per model and globally, their kinds and defaults are declared by the method's
module (ConfigMethod); mergekit's conventions hold for mergekit's methods. Anything else (unknown keys,
per-tensor parameter lists, other methods) is refused, never ignored.
"""

from __future__ import annotations

import math
import os
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..methods import CONFIG_METHODS, REQUIRED, ConfigMethod, GroupCall
from ..options import ConfigError

METHODS = tuple(CONFIG_METHODS)
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "fusedmerge"}
FUSEDMERGE_KEYS = {"shard_size"}
MAX_SIZE = 2**63  # bytes
MAX_TEXT, MAX_NODES = 1 << 20, 10_000  # a configuration's characters, and its YAML nodes with aliases expanded
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def describe_methods() -> str:
    """The methods a configuration may name, with their keys (for --help)."""
    lines = []
    for c in CONFIG_METHODS.values():
        peer = f"mergekit's {c.name}" if c.peer == "mergekit" else "fusedmerge's own"
        show = lambda k, p: f"{k} (required)" if p.default is REQUIRED else f"{k}={p.default}"  # noqa: E731
        keys = ", ".join(show(k, p) for k, p in c.model_params.items()) or "none"
        glob = ", ".join(show(k, p) for k, p in c.global_params.items()) or "none"
        lines.append(f"{c.name} ({peer}{'' if c.needs_base else ', no base_model'}): {c.doc}; "
                     f"per model: {keys}; parameters: {glob}" + ("" if c.whole_model else
                     f"; tensors over half the budget: {'in row blocks' if c.blocks else 'whole'}"))
    return "\n".join(lines)


@dataclass
class ModelSpec:
    path: str
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    method: str
    models: List[ModelSpec]
    base: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    out_dtype: Optional[torch.dtype] = None
    seed: int = 0
    shard_size: int = 2 << 30
    text: str = ""

    @property
    def spec(self) -> ConfigMethod:
        return CONFIG_METHODS[self.method]

    def param(self, key: str):
        """A global parameter, or the method's default for it."""
        return self.params.get(key, self.spec.global_params[key].default)

    def group_call(self, base, models, backend: str = "auto", name: str = "tensor") -> GroupCall:
        """One group of tensors to merge as this configuration says (see ConfigMethod.merge)."""
        weights = [m.params.get("weight", 1.0) for m in self.models]
        densities = [m.params.get("density") for m in self.models]
        return GroupCall(base, models, weights, densities, self.params, self.seed, self.out_dtype, backend, name)


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
    if isinstance(value, dict):
        value = value.get("model", value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model directory path, got {show(value)} (LoRA and hub models are not supported)")
    if "+" in value:
        raise ConfigError(f"{where}: {value!r} looks like a model+LoRA reference, which is not supported")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))


def parse(data: Any, *, root: str = ".", text: str = "") -> MergeConfig:
    """A MergeConfig from the YAML document `data`; relative paths are taken from `root` (the working
    directory for files, as mergekit does)."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a YAML mapping with merge_method and models")
    _unknown(data, TOP_KEYS, "configuration")
    method = data.get("merge_method")
    if not isinstance(method, str) or method not in CONFIG_METHODS:
        raise ConfigError(f"merge_method {show(method)} is not supported; fusedmerge implements {list(METHODS)}")
    spec = CONFIG_METHODS[method]
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    models = []
    for i, item in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with a 'model' key, got {show(item)}")
        _unknown(item, {"model", "parameters"}, where)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.parameters must be a mapping")
        _unknown(params, spec.model_params, f"{where}.parameters for {method}")
        checked = {k: spec.model_params[k].check(v, f"{where}.parameters.{k}") for k, v in params.items()}
        models.append(ModelSpec(_path(item.get("model"), where, root), checked))
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("parameters must be a mapping")
    _unknown(params, spec.global_params, f"parameters for {method}")
    params = {k: spec.global_params[k].check(v, f"parameters.{k}") for k, v in params.items()}
    missing = [k for k, p in spec.global_params.items() if p.default is REQUIRED and k not in params]
    if missing:
        raise ConfigError(f"{method} needs parameters.{missing[0]}")
    base = data.get("base_model")
    if not spec.needs_base:
        if base is not None:
            raise ConfigError(f"{method} takes no base_model (mergekit ignores it); list it under models instead")
    elif base is None:
        raise ConfigError(f"{method} needs a base_model")
    base = _path(base, "base_model", root) if base is not None else None
    others = [m for m in models if m.path != base]
    if spec.peer == "mergekit" and others:  # mergekit: the base listed among the models is the base
        models = others
    cfg = MergeConfig(method, models, base, params, text=text)
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None:
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ConfigError(f"dtype {show(dtype)} is not supported; choose one of {sorted(DTYPES)}")
        cfg.out_dtype = DTYPES[dtype]
    cfg.seed = check_seed(data.get("seed", 0))
    own = data.get("fusedmerge") or {}
    if not isinstance(own, dict):
        raise ConfigError("fusedmerge must be a mapping of fusedmerge's options")
    _unknown(own, FUSEDMERGE_KEYS, "fusedmerge")
    if "shard_size" in own:
        cfg.shard_size = parse_size(own["shard_size"], "fusedmerge.shard_size")
    if spec.check is not None:  # refuse what the method cannot carry out now, before any work
        spec.check([m.params for m in models])
    return cfg


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


def _expanded_nodes(root, what: str) -> int:
    """How many nodes the YAML graph at `root` has as a tree (aliases expanded), counted without
    expanding it; above MAX_NODES the count stops there. Raises ConfigError on a recursive alias."""
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
            path.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
    return sizes[id(root)]
