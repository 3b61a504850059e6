"""Layer indices from tensor names, for the architectures whose layers fusedmerge maps as mergekit 0.1.5 does
(mergekit/_data/architectures/*.json): decoder layers named `model.layers.{i}.…`, the embedding
(`model.embed_tokens.weight`) planned before the layers, every other non-layer tensor (final norm, lm_head)
after them, and the layer count in config.json's `num_hidden_layers`."""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Tuple

from ..options import ConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
                 "Gemma2ForCausalLM", "Gemma3ForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
PRE_WEIGHTS = ("model.embed_tokens.weight",)
LAYERS_KEY = "num_hidden_layers"


def read_config(path: str) -> dict:
    """A model directory's config.json ({} where it has none)."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot be read ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


def require_layers(path: str, why: str) -> None:
    """Refuse a model whose layers fusedmerge cannot map, saying why the configuration needs them."""
    names = read_config(path).get("architectures") or []
    if not any(n in ARCHITECTURES for n in names):
        raise ConfigError(f"{why} needs layer indices, and fusedmerge maps the layers of {', '.join(ARCHITECTURES)} "
                          f"only; {path} is {names or 'of an unknown architecture (no config.json architectures)'}")


def layer_of(name: str) -> Optional[Tuple[int, str]]:
    """(layer index, the rest of the name) of a layer tensor; None for the others."""
    m = LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def layer_name(index: int, rest: str) -> str:
    return f"model.layers.{index}.{rest}"
