"""The safetensors format, read through a memory map and written shard by shard, without the
`safetensors` package (the format is an 8-byte little-endian header size, a JSON header of
{name: {dtype, shape, data_offsets: [begin, end]}} plus optional "__metadata__", then the raw bytes).

Reading never unpickles and validates the header against the file before any tensor is used, so a
truncated or corrupt file is an error naming the file, not garbage. Pages of a tensor are dropped from the
process (madvise DONTNEED) once the tensor is released, so resident memory follows what is in use, not
what has been read.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is: missing, truncated, corrupt or unsafe."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a file: absolute byte range, dtype and shape."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: str) -> Tuple[Dict[str, Entry], Dict[str, str]]:
    """Entries and metadata of a safetensors file, checked against its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header size {n} does not fit the file ({size} bytes): "
                                      "truncated or not safetensors")
            raw = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    entries: Dict[str, Entry] = {}
    data_start = 8 + n
    for name, spec in raw.items():
        if isinstance(spec, dict) and spec.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {spec.get('dtype')!r}, which fusedmerge does not "
                                  f"read (supported: {sorted(DTYPES)})")
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry ({e!r})") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape or byte range")
        if end - begin != math.prod(shape) * element_size(dtype):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} {spec['dtype']}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"the file has {size}")
        entries[name] = Entry(dtype, shape, data_start + begin, data_start + end)
    return entries, metadata


class SafetensorsFile:
    """A safetensors file mapped into memory (copy-on-write: tensors are writable, the file never is)."""

    def __init__(self, path: str):
        self.path = path
        self.entries, self.metadata = read_header(path)
        self._file = open(path, "rb")
        size = os.path.getsize(path)
        self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        count = math.prod(e.shape)
        if count == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map, dtype=e.dtype, count=count, offset=e.begin)
        return flat.reshape(e.shape)

    def _advise(self, names: Sequence[str], advice: int) -> None:
        if self._map is None:
            return
        for name in names:
            e = self.entries[name]
            start = e.begin - e.begin % PAGE
            if e.end > start:
                self._map.madvise(advice, start, e.end - start)

    def prefetch(self, names: Sequence[str]) -> bool:
        """Read these tensors' pages and map them now (MADV_POPULATE_READ, Linux ≥ 5.14), so that using them
        takes no page faults; where the kernel lacks it, only ask for readahead and return False."""
        try:
            self._advise(names, MADV_POPULATE_READ)
            return True
        except OSError:
            self._advise(names, mmap.MADV_WILLNEED)
            return False

    def release(self, names: Sequence[str]) -> None:
        """Drop these tensors' pages from the process: they are read again from the file if used again.
        Tensors returned by `tensor()` for them must no longer be used after modifying them."""
        self._advise(names, mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # tensors still point into the map: the OS unmaps it when they go
                pass
        self._file.close()


def header_bytes(tensors: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The 8-byte size plus JSON header for tensors written in this order, padded to 8 bytes."""
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * element_size(dtype)
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_file(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a whole state dict as one safetensors file."""
    head = header_bytes([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], metadata)
    with open(path, "wb") as f:
        f.write(head)
        for t in tensors.values():
            f.write(tensor_bytes(t.cpu()))
