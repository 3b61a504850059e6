"""The safetensors format, read through a memory map and written shard by shard, without the
`safetensors` package (the format is an 8-byte little-endian header size, a JSON header of
{name: {dtype, shape, data_offsets: [begin, end]}} plus optional "__metadata__", then the raw bytes).

Reading never unpickles and validates the header against the file before any tensor is used, so a
truncated or corrupt file is an error naming the file, not garbage. Pages of a tensor are dropped from the
process (madvise DONTNEED) once the tensor is released, so resident memory follows what is in use, not
what has been read.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass
from itertools import accumulate
from typing import Dict, Optional, Sequence, Tuple

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the `safetensors` package's limit
MAX_DEPTH = 16  # JSON nesting: a header is 3 deep, an index 2
NESTING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[^][{}"]+')  # strings, and runs of everything but brackets
BRACKETS = str.maketrans("{[}]", "\x01\x01\xff\xff", '"')  # +1 and -1 as signed bytes
PAGE = mmap.PAGESIZE
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _libc_madvise():
    """libc's madvise through ctypes, which releases the GIL during the call (mmap.madvise holds it: a
    prefetch thread populating a group's pages would stall the merging thread for as long), or None."""
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


LIBC_MADVISE = _libc_madvise()


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
    return dtype.itemsize


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, what: str):
    """Strict JSON, as the `safetensors` package (serde_json) reads it: UTF-8, no NaN or Infinity, strings
    without lone surrogates, objects without duplicate keys, nesting at most MAX_DEPTH deep (checked before
    parsing). Raises CheckpointError naming `what`."""
    try:
        text = raw.decode("utf-8")
        steps = NESTING.sub("", text).translate(BRACKETS).encode("latin-1")
        depth = max(accumulate(memoryview(steps).cast("b")), default=0)
        if depth > MAX_DEPTH:
            raise ValueError(f"nested {depth} deep, more than {MAX_DEPTH}")
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_object, parse_int=_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
        raise CheckpointError(f"{what}: corrupt JSON ({e})") from None


def _int(text: str):
    return -0.0 if text == "-0" else int(text)  # serde_json reads -0 as a float


def _object(pairs):
    out = {}
    for key, value in pairs:
        _valid_text(key)
        if isinstance(value, str):
            _valid_text(value)
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _valid_text(s: str) -> None:
    s.encode("utf-8")  # a lone surrogate (an escape such as \\ud800) raises UnicodeEncodeError


def _u64(value, bits: int = 64) -> bool:
    return type(value) is int and 0 <= value < 1 << bits


def read_header(path: str, f=None) -> Tuple[Dict[str, Entry], Dict[str, str]]:
    """Entries and metadata of a safetensors file (read from `f`, the file opened in binary mode, if given),
    checked as the format requires: JSON types exactly (integers, not floats or bools), offsets that tile
    the data section from 0 to the end of the file, sizes that match dtype and shape. Anything else is a
    CheckpointError naming the file."""
    try:
        if f is None:
            with open(path, "rb") as f:
                return read_header(path, f)
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: header size {n} does not fit the file ({size} bytes): "
                                  "truncated or not safetensors")
        raw = parse_json(f.read(n), f"{path}: safetensors header")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries: Dict[str, Entry] = {}
    data_start = 8 + n
    for name, spec in raw.items():
        entries[name] = _entry(path, name, spec, data_start)
    end = data_start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {e.begin - data_start} of the data, "
                                  f"expected {end - data_start}: the tensors must tile the data without gaps or overlaps")
        end = e.end
    if end != size:
        what = "truncated" if end > size else "has bytes after the last tensor"
        raise CheckpointError(f"{path}: {what}: the tensors end at byte {end}, the file has {size}")
    return entries, metadata


def _entry(path: str, name: str, spec, data_start: int) -> Entry:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CheckpointError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets, got {spec!r:.200}")
    code, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r:.100}, which fusedmerge does not "
                              f"read (supported: {sorted(DTYPES)})")
    if not isinstance(shape, list) or not all(_u64(d, 63) for d in shape):  # torch's sizes are int64
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape!r:.100}: expected a list of integers "
                              "from 0 to 2**63 - 1")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(x) for x in offsets) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {offsets!r:.100}: expected [begin, end], "
                              "integers with 0 ≤ begin ≤ end")
    begin, end = offsets
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * element_size(dtype)
    if nbytes >= 1 << 64 or end - begin != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {tuple(shape)} {code}")
    return Entry(dtype, tuple(shape), data_start + begin, data_start + end)


class SafetensorsFile:
    """A safetensors file mapped into memory (copy-on-write: tensors are writable, the file never is)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
        try:
            self.stat = os.fstat(self._file.fileno())
            self.entries, self.metadata = read_header(path, self._file)
            self._map = mmap.mmap(self._file.fileno(), self.stat.st_size, access=mmap.ACCESS_COPY)
        except BaseException:
            self._file.close()
            raise

    def changed(self) -> Optional[str]:
        """How the file at `path` differs from the one mapped (replaced, resized, modified), or None."""
        try:
            now = os.stat(self.path)
        except OSError as e:
            return f"cannot be read any more ({e.strerror or e})"
        if (now.st_dev, now.st_ino) != (self.stat.st_dev, self.stat.st_ino):
            return "was replaced by another file"
        if now.st_size != self.stat.st_size:
            return f"changed size from {self.stat.st_size} to {now.st_size} bytes"
        if now.st_mtime_ns != self.stat.st_mtime_ns:
            return "was modified"
        return None

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        count = math.prod(e.shape)
        if count == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map, dtype=e.dtype, count=count, offset=e.begin)
        return flat.reshape(e.shape)

    def maps(self, t: torch.Tensor) -> bool:
        """Whether `t`'s memory lies in this file's map."""
        if self._map is None or t.device.type != "cpu" or not t.numel():
            return False
        return 0 <= t.data_ptr() - ctypes.addressof(ctypes.c_char.from_buffer(self._map)) < len(self._map)

    def _advise(self, names: Sequence[str], advice: int, span: Optional[Tuple[int, int]] = None) -> None:
        if self._map is None:
            return
        ranges = []
        for name in names:
            e = self.entries[name]
            begin, end = (e.begin, e.end) if span is None else (e.begin + span[0], min(e.begin + span[1], e.end))
            start = begin - begin % PAGE
            if end > start:
                ranges.append((start, end - start))
        if LIBC_MADVISE is None or not ranges:
            for start, length in ranges:
                self._map.madvise(advice, start, length)
            return
        view = (ctypes.c_char * len(self._map)).from_buffer(self._map)  # the map's address; no copy
        try:
            for start, length in ranges:
                if LIBC_MADVISE(ctypes.addressof(view) + start, length, advice) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
        finally:
            del view

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

    def release_bytes(self, name: str, begin: int, end: int) -> None:
        """`release` for bytes [begin, end) of one tensor's data (the pages they touch)."""
        self._advise([name], mmap.MADV_DONTNEED, (begin, end))

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
