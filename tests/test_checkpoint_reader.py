"""The checkpoint reader against the `safetensors` package: every file, crafted or randomly mutated, is either
read exactly as `safetensors.safe_open` reads it (names, dtypes, shapes, bytes, metadata) or refused with
CheckpointError — never accepted where safetensors refuses it, never another exception. Index files and
model directories are refused the same way."""

import json
import os
import random
import struct
import time

import pytest
import torch

from fusedmerge import cli
from fusedmerge.checkpoint.model_dir import ModelDir
from fusedmerge.checkpoint.safetensors import CheckpointError, SafetensorsFile, write_file

safetensors = pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402


def ours(path):
    """{name: tensor}, metadata as fusedmerge reads the file, or None when it refuses it."""
    try:
        f = SafetensorsFile(str(path))
    except CheckpointError:
        return None
    try:
        return {k: f.tensor(k).clone() for k in f.entries}, f.metadata
    finally:
        f.close()


def theirs(path):
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception:  # noqa: BLE001 — safetensors raises several types; any is a refusal
        return None


def same(a, b):
    """Same dtype, shape and bits (bools by value: a byte of 33 is True, as a copy makes it 1)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a.to(torch.uint8) != 0, b.reshape(-1).view(torch.uint8).reshape(b.shape) != 0)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def verdict(path) -> str:
    """'read' (as safetensors reads it) or 'refused' (CheckpointError); anything else fails the test."""
    got = ours(path)
    if got is None:
        return "refused"
    want = theirs(path)
    assert want is not None, f"fusedmerge reads a file that safetensors refuses: {open(path, 'rb').read()[:300]!r}"
    assert sorted(got[0]) == sorted(want[0]) and got[1] == want[1]
    assert all(same(got[0][k], want[0][k]) for k in want[0])
    return "read"


def raw_file(path, header, data=b"", n=None):
    """A file with this header (a dict, or JSON text/bytes as given) and data; `n` overrides the size field."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8", "surrogatepass")
    path.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return path


def one(dtype="F32", shape=(2, 2), offsets=(0, 16), **extra):
    return {"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets, **extra}}


DATA = bytes(range(16))
REFUSED = {  # what safetensors refuses, which fusedmerge once accepted or crashed on
    "nested header": ("[" * 5000 + "]" * 5000, DATA),
    "nested tensor entry": ('{"t": ' + "{" * 3000 + "}" * 3000 + "}", b""),
    "float dim": (one(shape=[2.5, 2]), DATA),
    "integral float dim": (one(shape=[2.0, 2]), DATA),
    "string shape": (one(shape="22"), DATA),
    "bool dim": (one(shape=[True, 4]), DATA),
    "dict shape": (one(shape={"a": 2}), DATA),
    "negative dim": (one(shape=[-2, -2]), DATA),
    "minus zero dim": ('{"t": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', b""),
    "infinite dim": ('{"t": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 16]}}', DATA),
    "nan dim": ('{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 16]}}', DATA),
    "2**64 dim": (one(shape=[2**64, 0]), b""),
    "2**63 dim of an empty tensor": (one(shape=[0, 2**63], offsets=[0, 0]), b""),
    "overflowing size": (one(shape=[2**32, 2**32]), DATA),
    "huge exponent dim": ('{"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}', DATA),
    "float offsets": (one(offsets=[0.0, 16.0]), DATA),
    "string offsets": (one(offsets=["0", "16"]), DATA),
    "bool offset": (one(dtype="U8", shape=[1], offsets=[False, True]), b"\x01"),
    "2**64 offset": (one(offsets=[2**64, 2**64 + 16]), DATA),
    "three offsets": (one(offsets=[0, 16, 16]), DATA),
    "reversed offsets": (one(dtype="U8", shape=[0], offsets=[16, 0]), DATA),
    "list dtype": (one(dtype=["F32"]), DATA),
    "dict dtype": (one(dtype={"F32": 1}), DATA),
    "unknown dtype": (one(dtype="F33"), DATA),
    "lone surrogate name": ('{"\\ud800": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', DATA),
    "lone surrogate metadata": ('{"__metadata__": {"k": "\\udfff"}}', b""),
    "non-string metadata": ({"__metadata__": {"k": 1}}, b""),
    "metadata list": ({"__metadata__": ["k"]}, b""),
    "gap before the data": (one(offsets=[4, 20]), bytes(20)),
    "gap between tensors": ({**one(), "u": {"dtype": "U8", "shape": [1], "data_offsets": [17, 18]}}, bytes(18)),
    "overlapping tensors": ({**one(), "u": {"dtype": "U8", "shape": [1], "data_offsets": [15, 16]}}, DATA),
    "bytes after the data": (one(), DATA + b"\0"),
    "truncated data": (one(), DATA[:-1]),
    "size mismatch": (one(shape=[3]), DATA),
    "missing shape": ({"t": {"dtype": "F32", "data_offsets": [0, 16]}}, DATA),
    "entry not an object": ({"t": [1, 2]}, DATA),
    "header a list": ("[]", b""),
    "header not json": ("{t", b""),
    "utf-16 header": ('{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}'.encode("utf-16-le"), DATA),
    "header size past the end": ("{}", b"", 1000),
    "header size over the limit": ("{}", b"", 100_000_001),
    "duplicate names": ('{"t": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, '
                        '"t": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]}}', DATA),
}
READ = {  # valid files, read as safetensors reads them
    "one tensor": (one(), DATA),
    "scalar": (one(shape=[], offsets=[0, 4]), DATA[:4]),
    "empty tensors": ({"a": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                       "b": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                       "c": {"dtype": "I64", "shape": [0], "data_offsets": [8, 8]}}, DATA[:8]),
    "out of order": ({"b": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]},
                      "a": {"dtype": "BOOL", "shape": [2, 4], "data_offsets": [0, 8]}}, bytes([0, 1] * 8)),
    "unknown entry key": (one(extra="ignored"), DATA),
    "null metadata": ({"__metadata__": None, **one()}, DATA),
    "metadata": ({"__metadata__": {"format": "pt", "k": "\u00e9\U0001f600"}, **one()}, DATA),
    "padding": ('{"t": {"dtype": "F16", "shape": [8], "data_offsets": [0, 16]}}      ', DATA),
    "no tensors": ("{}", b""),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_safetensors_refuses_is_refused_with_checkpoint_error(tmp_path, case):
    path = raw_file(tmp_path / "x.safetensors", *REFUSED[case])
    assert theirs(path) is None
    assert verdict(path) == "refused"


@pytest.mark.parametrize("case", list(READ))
def test_valid_files_are_read_as_safetensors_reads_them(tmp_path, case):
    path = raw_file(tmp_path / "x.safetensors", *READ[case])
    assert verdict(path) == "read"


def test_files_written_by_safetensors_and_by_fusedmerge_are_read_alike(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(3, 5, generator=g), "h": torch.randn(7, generator=g).half(), "e": torch.empty(0, 2),
               "b": torch.randn(2, 2, generator=g).bfloat16(), "i": torch.arange(5), "m": torch.tensor([True, False]),
               "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn), "s": torch.tensor(2.5, dtype=torch.float64)}
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    write_file(str(tmp_path / "ours.safetensors"), tensors, {"format": "pt"})
    for name in ("theirs", "ours"):
        assert verdict(tmp_path / f"{name}.safetensors") == "read"
        got = ours(tmp_path / f"{name}.safetensors")[0]
        assert all(same(got[k], tensors[k]) for k in tensors)


# ---------------------------------------------------------------------------------------------------------
# Seeded mutation fuzzer
# ---------------------------------------------------------------------------------------------------------

ODD_VALUES = ["-0", "0", "1", "-1", "2.0", "2.5", "1e400", "NaN", "Infinity", "true", "null", '"8"', "[]", "{}",
              "[0, 8]", "[8]", "[2, 2]", str(2**64), str(2**64 - 1), str(2**63), '"F32"', '"BF16"', '"U8"', '"F4"',
              '"\\ud800"', "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]", "[0, 8, 8]", "[8, 0]"]


def seeds():
    """Valid files to mutate: fusedmerge's writer and safetensors' (which orders and aligns differently)."""
    g = torch.Generator().manual_seed(1)
    tensors = {"a.weight": torch.randn(2, 3, generator=g), "a.bias": torch.randn(3, generator=g).bfloat16(),
               "n": torch.arange(4, dtype=torch.int16), "z": torch.empty(0), "m": torch.tensor([True])}
    return tensors


def header_of(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def mutate_json(rng, header: dict) -> str:
    """The header as JSON text with one field of one tensor replaced by an odd value or removed, its offsets
    shifted or swapped with another tensor's, odd metadata, or (keeping the file valid) a tensor renamed,
    its dims permuted, the entries reordered or the header padded; sometimes a name duplicated."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = dict(header[name])
    field = rng.choice(["dtype", "shape", "data_offsets"])
    kind = rng.randrange(10)
    marker = "@@odd@@"
    if kind == 0:
        entry[field] = marker
    elif kind == 1:
        entry.pop(field, None)
    elif kind == 2:
        entry["data_offsets"] = [x + rng.choice([-1, 1, 8]) * rng.randrange(2) for x in entry["data_offsets"]]
    elif kind == 3:
        other = rng.choice(names)
        entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], entry["data_offsets"]
    elif kind == 4:
        entry["shape"] = [marker if rng.random() < 0.5 else d for d in entry["shape"]] + [marker] * rng.randrange(2)
    elif kind == 5:
        header["__metadata__"] = {"format": marker}
    elif kind == 6:
        header[rng.choice(["[{\"x\"", "\u00e9.w", "a]}]", ""])] = header.pop(name)
        name = None
    elif kind == 7:
        entry["shape"] = rng.sample(entry["shape"], len(entry["shape"]))
    elif kind == 8:
        items = list(header.items())
        rng.shuffle(items)
        header = dict(items)
    if name is not None:
        header[name] = entry
    text = json.dumps(header, ensure_ascii=rng.random() < 0.5) + " " * rng.randrange(3) * (kind == 9)
    while marker in text:
        text = text.replace(f'"{marker}"', rng.choice(ODD_VALUES), 1)
    if rng.random() < 0.05 and name is not None:  # a duplicated name
        text = text.rstrip()[:-1] + ", " + json.dumps(name) + ": " + json.dumps(header[names[0]]) + "}"
    return text


def mutate(rng, data: bytes) -> bytes:
    """One to three mutations: a header field (JSON-aware), bytes flipped, inserted, deleted or cut, or
    the header size changed."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        if kind <= 2:
            try:
                header, body = header_of(data)
                text = mutate_json(rng, header).encode("utf-8", "surrogatepass")
            except (ValueError, struct.error, LookupError, AttributeError, TypeError):  # already broken
                continue
            data = struct.pack("<Q", len(text)) + text + body
        elif kind == 3 and data:
            i = rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
        elif kind == 4:
            i = rng.randrange(len(data) + 1)
            data = data[:i] + bytes([rng.choice(b'{}[]",:0123456789 -\\e\x00\xff')]) * rng.randint(1, 4) + data[i:]
        elif kind == 5 and data:
            i = rng.randrange(len(data))
            data = data[:i] + data[i + rng.randint(1, 8):] if rng.random() < 0.8 else data[:i]
        elif kind == 6 and len(data) >= 8:
            (n,) = struct.unpack("<Q", data[:8])
            n = rng.choice([n + rng.randint(-9, 9), 0, 2**64 - 1, len(data)])
            data = struct.pack("<Q", max(0, min(n, 2**64 - 1))) + data[8:]
    return data


def test_seeded_mutations_are_read_as_safetensors_reads_them_or_refused(tmp_path):
    tensors = seeds()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    write_file(str(tmp_path / "b.safetensors"), tensors, {"format": "pt"})
    originals = [(tmp_path / n).read_bytes() for n in ("a.safetensors", "b.safetensors")]
    rng = random.Random(20240613)
    counts = {"read": 0, "refused": 0}
    path = tmp_path / "m.safetensors"
    started = time.perf_counter()
    for _ in range(3000):
        path.unlink(missing_ok=True)  # faster than truncating
        path.write_bytes(mutate(rng, rng.choice(originals)))
        counts[verdict(path)] += 1
    assert min(counts.values()) >= 300, counts  # the mutations reach both outcomes
    assert time.perf_counter() - started < 60


# ---------------------------------------------------------------------------------------------------------
# Index files and model directories
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    write_file(str(d / "a.safetensors"), {"x": torch.ones(2)})
    write_file(str(d / "b.safetensors"), {"y": torch.zeros(3)})
    return d


def write_index(d, weight_map_text):
    (d / "model.safetensors.index.json").write_text('{"metadata": {}, "weight_map": ' + weight_map_text + "}")


@pytest.mark.parametrize("weight_map", [
    '{"x": "a.safetensors", "y": 3}', '{"x": "a.safetensors", "y": null}', '{"x": ["a.safetensors"]}',
    '{"x": {"f": "a.safetensors"}}', '["a.safetensors"]', '"a.safetensors"', '{"x": "a.safetensors", "y": "\\ud800"}',
    "[" * 3000 + "]" * 3000, '{"x": "a.safetensors", "x": "b.safetensors"}', '{"x": NaN}'])
def test_bad_index_files_are_refused_with_checkpoint_error(sharded, weight_map):
    write_index(sharded, '{"x": "a.safetensors", "y": "b.safetensors"}')
    assert sorted(ModelDir(str(sharded)).where) == ["x", "y"]
    write_index(sharded, weight_map)
    with pytest.raises(CheckpointError, match="index"):
        ModelDir(str(sharded))


def test_a_checkpoint_without_tensors_is_refused(tmp_path, capsys):
    for name in ("base", "m"):
        (tmp_path / name).mkdir()
        raw_file(tmp_path / name / "model.safetensors", {"__metadata__": {"format": "pt"}})
    with pytest.raises(CheckpointError, match="no tensors"):
        ModelDir(str(tmp_path / "m"))
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'm'}}}]\n")
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    assert "no tensors" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_refused_file_is_named_in_the_cli_error(tmp_path, capsys):
    for name in ("base", "m"):
        (tmp_path / name).mkdir()
        write_file(str(tmp_path / name / "model.safetensors"), {"w": torch.ones(4)})
    bad = tmp_path / "m" / "model.safetensors"
    raw_file(bad, one(shape=[2.5, 2]), DATA)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'm'}}}]\n")
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "shape [2.5, 2]" in err and not os.path.exists(tmp_path / "out")


def test_prefetch_and_release_advise_the_mapped_pages_and_report_errors(tmp_path):
    """madvise runs through libc with the GIL released (checkpoint/safetensors.py); the pages it populates and
    drops still read as the file's values, and an advice the kernel refuses is an OSError (prefetch's
    fallback to WILLNEED relies on it), never a silent no-op."""
    from fusedmerge.checkpoint import safetensors as st

    x = torch.arange(300_000, dtype=torch.float32).reshape(600, 500)
    write_file(str(tmp_path / "a.safetensors"), {"x": x, "y": x[:3].clone()})
    f = SafetensorsFile(str(tmp_path / "a.safetensors"))
    try:
        f.prefetch(["x", "y"])
        assert torch.equal(f.tensor("x"), x)
        f.release(["x"])
        assert torch.equal(f.tensor("x"), x) and torch.equal(f.tensor("y"), x[:3])
        if st.LIBC_MADVISE is not None:
            with pytest.raises(OSError):
                f._advise(["x"], 12345)
    finally:
        f.close()


def test_maps_tells_views_of_the_mapped_file_from_other_tensors(tmp_path):
    """The merge drops a group's input pages as soon as it is merged unless an output is a view of them
    (passthrough): `maps` must recognise such views, and only them."""
    x = torch.arange(20_000, dtype=torch.float32).reshape(200, 100)
    write_file(str(tmp_path / "model.safetensors"), {"x": x, "y": x[:3].clone()})
    d = ModelDir(str(tmp_path))
    try:
        view = d.tensor("x")
        assert d.maps(view) and d.maps(view[150:]) and d.maps(d.tensor("y").reshape(-1)[1:])
        assert not d.maps(view.clone()) and not d.maps(x) and not d.maps(torch.empty(0))
        assert not d.maps(view.to(torch.float64))
    finally:
        d.close()
