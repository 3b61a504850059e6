"""The output directory: a shard plan fixed before any tensor is merged, shards written as they fill, the
index, the base's config and tokenizer files, and a model card."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..options import ConfigError
from .config import MergeConfig
from .safetensors import element_size, header_bytes, tensor_bytes
from .shard_file import ShardFile, staging_buffer

INDEX = "model.safetensors.index.json"
STAGING = 64 << 20  # bytes per direct write at most: 16 MB writes left this VM's disk idle between requests
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "vocab*",
               "merges.txt", "added_tokens.json", "*.model", "preprocessor_config.json", "chat_template*")


class ShardPlan:
    """Keys cut into consecutive shards of at most `shard_size` bytes (a larger tensor gets its own), each
    shard owned by one of `world` ranks: the largest unassigned shard goes to the least loaded rank."""

    def __init__(self, entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], shard_size: int, world: int):
        self.entries = {k: (dtype, tuple(shape)) for k, dtype, shape in entries}
        self.shards: List[List[str]] = []
        size = 0
        for k in self.entries:
            n = self.nbytes(k)
            if not self.shards or (size + n > shard_size and size > 0):
                self.shards.append([])
                size = 0
            self.shards[-1].append(k)
            size += n
        count = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shard_of = {k: i for i, keys in enumerate(self.shards) for k in keys}
        load = [0] * world
        self.owner = [0] * count
        for i in sorted(range(count), key=lambda i: (-self.shard_bytes(i), i)):
            rank = min(range(world), key=lambda r: (load[r], r))
            self.owner[i] = rank
            load[rank] += self.shard_bytes(i)

    def nbytes(self, key: str) -> int:
        dtype, shape = self.entries[key]
        return math.prod(shape) * element_size(dtype)

    def shard_bytes(self, i: int) -> int:
        return sum(self.nbytes(k) for k in self.shards[i])

    def keys_of(self, rank: int) -> List[str]:
        return [k for i, keys in enumerate(self.shards) if self.owner[i] == rank for k in keys]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(k) for k in self.entries)


class ShardWriter:
    """Writes the shards one rank owns, each as soon as its first tensor arrives, in plan order, through one
    staging buffer (checkpoint/shard_file.py: direct I/O where the file system takes it) of STAGING bytes, or a
    quarter of `memory_budget`, or the largest shard, whichever is smallest."""

    def __init__(self, plan: ShardPlan, directory: str, rank: int, memory_budget: Optional[int] = None,
                 direct: bool = True):
        self.plan, self.directory, self.direct = plan, directory, direct
        largest = max(map(plan.shard_bytes, range(len(plan.shards))), default=0)
        self.staging = staging_buffer(min(STAGING, largest, STAGING if memory_budget is None else memory_budget // 4))
        self.file, self.shard, self.next = None, None, 0

    def write(self, key: str, t: torch.Tensor) -> None:
        self.write_blocks(key, [t], tuple(t.shape))

    def write_blocks(self, key: str, blocks: Iterable[torch.Tensor], shape: Tuple[int, ...]) -> None:
        """Write one tensor of `shape` from consecutive blocks of its flattened elements, each as it comes."""
        i = self.plan.shard_of[key]
        if i != self.shard:
            if self.file is not None:
                raise RuntimeError(f"internal: shard {self.plan.names[self.shard]} left incomplete")
            keys = self.plan.shards[i]
            head = header_bytes([(k, *self.plan.entries[k]) for k in keys], {"format": "pt"})
            self.file = ShardFile(os.path.join(self.directory, self.plan.names[i]),
                                  len(head) + self.plan.shard_bytes(i), self.staging, self.direct)
            self.file.write(head)
            self.shard, self.next = i, 0
        keys = self.plan.shards[i]
        if keys[self.next] != key or tuple(shape) != self.plan.entries[key][1]:
            raise RuntimeError(f"internal: {key} {tuple(shape)} out of the plan's order or form")
        written = 0
        for t in blocks:
            if t.dtype != self.plan.entries[key][0]:
                raise RuntimeError(f"internal: {key} written as {t.dtype}, planned as {self.plan.entries[key][0]}")
            self.file.write(tensor_bytes(t))
            written += t.numel()
        if written != math.prod(shape):
            raise RuntimeError(f"internal: {key} got {written} elements of {math.prod(shape)}")
        self.next += 1
        if self.next == len(keys):
            self.file.close()
            self.file = None

    def close(self, failed: bool = False) -> None:
        """Close; a shard still open is an internal error unless the merge already failed."""
        if self.file is not None:
            self.file.close(failed=True)
            self.file = None
            if not failed:
                raise RuntimeError(f"internal: shard {self.plan.names[self.shard]} left incomplete")


def write_index(directory: str, plan: ShardPlan) -> None:
    weight_map: Dict[str, str] = {k: plan.names[plan.shard_of[k]] for k in plan.entries}
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}, f, indent=2)


def copy_model_files(source: str, directory: str) -> None:
    """The config, generation config and tokenizer files of `source`."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and any(fnmatch.fnmatch(name, p) for p in MODEL_FILES):
            shutil.copyfile(path, os.path.join(directory, name))


VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def check_same_vocabulary(dirs) -> None:
    """tokenizer_source: base copies the base's tokenizer and does not permute embedding rows, so every model
    must have the base's vocabulary files (those it has)."""
    base = dirs[0]
    for d in dirs[1:]:
        for name in VOCABULARY_FILES:
            a, b = os.path.join(base.path, name), os.path.join(d.path, name)
            if os.path.isfile(a) and os.path.isfile(b) and open(a, "rb").read() != open(b, "rb").read():
                raise ConfigError(f"tokenizer_source: base: {d.path}/{name} differs from the base's; fusedmerge does "
                                 "not permute embedding rows to the base's vocabulary (tokenizer surgery)")


def check_config(path: str) -> None:
    """The reference model's config.json, which becomes the output's: present and a JSON object (mergekit
    reads it too), so that no merge ends in a model without a usable configuration."""
    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} has no config.json; the merged model's configuration is this model's "
                          "(mergekit needs it too)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{file} is not a readable JSON configuration ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file} must hold a JSON object (a model configuration), got {type(config).__name__}")


def write_config(directory: str, cfg: MergeConfig, layers) -> None:
    """config.json as mergekit writes it: the layer count of a slices merge, the output dtype."""
    from .plan import updated_config

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path) or (layers is None and cfg.out_dtype is None):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(updated_config(config, cfg, layers), f, indent=2)


def write_model_card(directory: str, cfg: MergeConfig, plan: ShardPlan) -> None:
    from .. import __version__

    models = "\n".join(f"- `{m.path}`" + (f" layers {list(m.layers)}" if m.layers else "")
                       + (f" ({', '.join(f'{k} {v}' for k, v in m.params.items())})" if m.params else "")
                       for s in cfg.slices for m in s.models)
    card = (f"---\ntags:\n- merge\n- fusedmerge\n---\n# Merged model\n\n"
            f"Merged with fusedmerge {__version__}, method `{cfg.method}`"
            f"{f' on base `{cfg.base}`' if cfg.base else ''}, seed {cfg.seed}; "
            f"{len(plan.entries)} tensors, {plan.total_bytes / 1e9:.2f} GB in {len(plan.shards)} shard(s).\n\n"
            f"Models, in order:\n{models}\n\nConfiguration:\n\n```yaml\n{cfg.text.strip()}\n```\n")
    with open(os.path.join(directory, "README.md"), "w") as f:
        f.write(card)
