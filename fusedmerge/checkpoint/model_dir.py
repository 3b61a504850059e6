"""A model directory as Hugging Face writes it: `model.safetensors`, or shards listed by
`model.safetensors.index.json`; `.bin` weights only through torch.load(weights_only=True), never a pickle
that runs code. Shard names must stay inside the directory."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import torch

from .safetensors import CheckpointError, Entry, SafetensorsFile, element_size, parse_json

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _inside(directory: str, name: str) -> str:
    """The path of `name` in `directory`, refused when its name leads outside it (absolute, or through "..").
    The file itself may be a symlink (Hugging Face cache snapshots link their shards to blobs/)."""
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in parts:
        raise CheckpointError(f"{directory}: shard name {name!r} escapes the model directory; refused")
    return os.path.join(directory, name)


def _weight_map(directory: str, index_name: str) -> Dict[str, str]:
    """The index's weight_map: tensor names → shard file names, strictly (strings only)."""
    path = os.path.join(directory, index_name)
    try:
        with open(path, "rb") as f:
            index = parse_json(f.read(), f"{path}: index")
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable index ({e.strerror or e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: weight_map must map tensor names to shard file names")
    return weight_map


class ModelDir:
    """The tensors of one model directory: names, dtypes and shapes from the headers, data on demand."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: not a model directory")
        self._files: Dict[str, SafetensorsFile] = {}
        self._bins: Dict[str, Dict[str, torch.Tensor]] = {}
        self.where: Dict[str, str] = {}  # tensor name → file path
        try:
            if os.path.exists(os.path.join(path, SAFE_INDEX)):
                self._open_safetensors(_weight_map(path, SAFE_INDEX))
            elif os.path.exists(os.path.join(path, SAFE_SINGLE)):
                self._open_safetensors(None)
            elif os.path.exists(os.path.join(path, BIN_INDEX)) or os.path.exists(os.path.join(path, BIN_SINGLE)):
                self._open_bins()
            else:
                raise CheckpointError(f"{path}: no {SAFE_SINGLE}, {SAFE_INDEX} or {BIN_SINGLE} found")
            if not self.where:
                raise CheckpointError(f"{path}: the checkpoint holds no tensors")
        except BaseException:
            self.close()
            raise

    def _open_safetensors(self, weight_map) -> None:
        names = sorted(set(weight_map.values())) if weight_map is not None else [SAFE_SINGLE]
        for name in names:
            file = _inside(self.path, name)
            if not os.path.isfile(file):
                raise CheckpointError(f"{self.path}: shard {name!r} listed in the index is missing")
            self._files[file] = SafetensorsFile(file)
        if weight_map is None:
            self.where = {k: file for k in self._files[file].entries}
            return
        for key, name in weight_map.items():
            file = _inside(self.path, name)
            if key not in self._files[file].entries:
                raise CheckpointError(f"{self.path}: the index puts {key!r} in {name}, which does not hold it")
            self.where[key] = file

    def _open_bins(self) -> None:
        index = os.path.join(self.path, BIN_INDEX)
        names = sorted(set(_weight_map(self.path, BIN_INDEX).values())) if os.path.exists(index) else [BIN_SINGLE]
        for name in names:
            file = _inside(self.path, name)
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 — torch raises many types for bad pickles
                raise CheckpointError(f"{file}: cannot be loaded as plain tensors with weights_only=True ({e})") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise CheckpointError(f"{file}: not a state dict of tensors")
            self._bins[file] = sd
            self.where.update({k: file for k in sd})

    def entry(self, key: str) -> Tuple[torch.dtype, Tuple[int, ...]]:
        file = self.where[key]
        if file in self._files:
            e: Entry = self._files[file].entries[key]
            return e.dtype, e.shape
        t = self._bins[file][key]
        return t.dtype, tuple(t.shape)

    def nbytes(self, key: str) -> int:
        dtype, shape = self.entry(key)
        return math.prod(shape) * element_size(dtype)

    def tensor(self, key: str) -> torch.Tensor:
        file = self.where[key]
        return self._files[file].tensor(key) if file in self._files else self._bins[file][key]

    def _by_file(self, keys: Sequence[str]) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for k in keys:
            if self.where[k] in self._files:
                out.setdefault(self.where[k], []).append(k)
        return out

    def prefetch(self, keys: Sequence[str]) -> bool:
        """Map these tensors' pages now; False where some could only be scheduled for readahead."""
        return all([self._files[file].prefetch(names) for file, names in self._by_file(keys).items()])

    def release(self, keys: Sequence[str]) -> None:
        for file, names in self._by_file(keys).items():
            self._files[file].release(names)

    def release_bytes(self, key: str, begin: int, end: int) -> None:
        """`release` for bytes [begin, end) of one tensor's data (a row block)."""
        if self.where[key] in self._files:
            self._files[self.where[key]].release_bytes(key, begin, end)

    def maps(self, t: torch.Tensor) -> bool:
        """Whether `t` is a view of one of the safetensors files mapped here."""
        return any(f.maps(t) for f in self._files.values())

    def check_unchanged(self) -> None:
        """Fail if a file being merged was modified, resized or replaced since it was opened (checked
        between groups: a file truncated while its pages are read still ends the process with SIGBUS)."""
        for f in self._files.values():
            how = f.changed()
            if how:
                raise CheckpointError(f"{f.path} {how} while being merged; the merge is abandoned")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._bins.clear()
