"""Merge configurations: mergekit's YAML schema for the methods fusedmerge implements, plus its own keys.

    merge_method: linear | task_arithmetic | ties | dare_linear | dare_ties | opcm
    base_model: PATH                     (all but linear)
    models:                              (in order: OPCM merges them in this order)
      - model: PATH
        parameters: {weight: 1.0, density: 0.5}
    parameters: {lambda: 1.0, normalize: ..., rescale: true, int8_mask: ..., alpha: 0.5, variant: fusionbench}
    dtype: bfloat16                      (output dtype; mergekit's out_dtype wins when given)
    seed: 0                              (fusedmerge: DARE masks are keyed by seed and tensor name)
    fusedmerge: {shard_size: 2GB}        (fusedmerge's own options)

mergekit's conventions hold: `density` is the kept fraction, `weight` multiplies each task vector (before the
TIES vote), `normalize` divides by the summed weights (default true for linear and ties, false otherwise),
`lambda` scales the merged task vector, dare_linear's `rescale: true` keeps each tensor's L1 norm; TIES takes
a density per model, DARE one for all.
Anything else (unknown keys, per-tensor parameter lists, other methods) is refused, never ignored.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "opcm")
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "fusedmerge"}
MODEL_PARAMS = {"linear": {"weight"}, "task_arithmetic": {"weight"}, "ties": {"weight", "density"},
                "dare_linear": {"weight", "density"}, "dare_ties": {"weight", "density"}, "opcm": set()}
BOOL_PARAMS = ("normalize", "rescale", "int8_mask", "skip_nonleaf")
GLOBAL_PARAMS = {
    "linear": {"normalize"},
    "task_arithmetic": {"lambda", "normalize"},
    "ties": {"lambda", "normalize", "int8_mask"},
    "dare_linear": {"lambda", "normalize", "rescale", "int8_mask"},
    "dare_ties": {"lambda", "normalize", "rescale", "int8_mask"},
    "opcm": {"alpha", "variant", "skip_nonleaf"},
}
NORMALIZE_DEFAULT = {"linear": True, "ties": True}
FUSEDMERGE_KEYS = {"shard_size"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


class ConfigError(ValueError):
    """A merge configuration fusedmerge cannot carry out as written."""


@dataclass
class ModelSpec:
    path: str
    weight: float = 1.0
    density: Optional[float] = None


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
    def normalize(self) -> bool:
        return bool(self.params.get("normalize", NORMALIZE_DEFAULT.get(self.method, False)))

    @property
    def densities(self) -> List[float]:
        """Each model's kept fraction (mergekit's default 1.0 where none is given)."""
        return [1.0 if m.density is None else m.density for m in self.models]

    @property
    def density(self) -> float:
        """The one kept fraction of a DARE merge, whose masks take one drop probability for every model."""
        values = sorted(set(self.densities))
        if len(values) > 1:
            raise ConfigError(f"{self.method}: per-model densities differ ({values}); fusedmerge's DARE takes one "
                              "density for every model (TIES takes one per model)")
        return values[0]


def parse_size(text) -> int:
    """'2GB', '512MiB', '1.5G', 1000000 → bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        s = str(text).strip().upper().replace(" ", "")
        num = s.rstrip("KMGTIB")
        unit = s[len(num):]
        try:
            value = float(num)
        except ValueError:
            raise ConfigError(f"cannot read the size {text!r}; write e.g. 512MB, 2GB or 1.5GiB") from None
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}.get(unit)
    if scale is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 512MB, 2GB or 1.5GiB")
    return int(value * scale)


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r} (per-tensor parameter lists are not supported)")
    if not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value}")
    return float(value)


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise ConfigError(f"{where}: unsupported key(s) {extra}; supported: {sorted(allowed)}")


def _path(value, where: str, root: str) -> str:
    if isinstance(value, dict):
        value = value.get("model", value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model directory path, got {value!r} (LoRA and hub models are not supported)")
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
    if method not in METHODS:
        raise ConfigError(f"merge_method {method!r} is not supported; fusedmerge implements {list(METHODS)}")
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models must be a non-empty list of {model: PATH, parameters: {...}}")
    models = []
    for i, item in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with a 'model' key, got {item!r}")
        _unknown(item, {"model", "parameters"}, where)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.parameters must be a mapping")
        _unknown(params, MODEL_PARAMS[method], f"{where}.parameters for {method}")
        spec = ModelSpec(_path(item.get("model"), where, root))
        if "weight" in params:
            spec.weight = _number(params["weight"], f"{where}.parameters.weight")
        if "density" in params:
            spec.density = _number(params["density"], f"{where}.parameters.density")
            if not 0 < spec.density <= 1:
                raise ConfigError(f"{where}.parameters.density is the kept fraction and must be in (0, 1], "
                                  f"got {spec.density}")
        models.append(spec)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("parameters must be a mapping")
    _unknown(params, GLOBAL_PARAMS[method], f"parameters for {method}")
    for key in ("lambda", "alpha"):
        if key in params:
            params[key] = _number(params[key], f"parameters.{key}")
    for key in BOOL_PARAMS:
        if key in params and not isinstance(params[key], bool):
            raise ConfigError(f"parameters.{key} must be true or false, got {params[key]!r}")
    if "variant" in params and params["variant"] not in ("fusionbench", "paper"):
        raise ConfigError(f"parameters.variant must be fusionbench or paper, got {params['variant']!r}")
    base = data.get("base_model")
    if method == "linear":
        if base is not None:
            raise ConfigError("linear takes no base_model (mergekit ignores it); list it under models instead")
    elif base is None:
        raise ConfigError(f"{method} needs a base_model")
    cfg = MergeConfig(method, models, _path(base, "base_model", root) if base is not None else None, params, text=text)
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
        cfg.out_dtype = DTYPES[dtype]
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    cfg.seed = seed
    own = data.get("fusedmerge") or {}
    if not isinstance(own, dict):
        raise ConfigError("fusedmerge must be a mapping of fusedmerge's options")
    _unknown(own, FUSEDMERGE_KEYS, "fusedmerge")
    if "shard_size" in own:
        cfg.shard_size = parse_size(own["shard_size"])
    if method.startswith("dare"):
        cfg.density  # noqa: B018 — refuse differing per-model densities now, before any work
    return cfg


def load(path: str) -> MergeConfig:
    """Read and check a YAML configuration file."""
    import yaml

    try:
        with open(path) as f:
            text = f.read()
        data = yaml.safe_load(text)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the configuration ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return parse(data, root=os.getcwd(), text=text)
