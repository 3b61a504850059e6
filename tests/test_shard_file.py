"""Output shards written through an aligned staging buffer with O_DIRECT, and the buffered fallback: the file
holds exactly the bytes given, whatever their sizes and alignment; a file system that refuses O_DIRECT at open
or at the first write gets the same bytes."""

import errno
import os

import pytest
import torch

from fusedmerge.checkpoint import shard_file
from fusedmerge.checkpoint.shard_file import ALIGN, ShardFile, staging_buffer


def pieces(seed=0):
    """A header-like bytes object, then tensors of awkward sizes (odd, below and above the staging size)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 4095, 4097, 3 * ALIGN, 40_001, 2 * 8192 + 3, 0, 7]
    return [b"\x10\x00\x00\x00\x00\x00\x00\x00{header}  "] + [
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]


def write(path, parts, staging=8192, direct=True):
    size = sum(len(p) if isinstance(p, bytes) else p.numel() for p in parts)
    f = ShardFile(str(path), size, staging_buffer(staging), direct)
    for p in parts:
        f.write(p if isinstance(p, bytes) else memoryview(p.numpy()))
    used = f.direct
    f.close()
    return used


def expected(parts):
    return b"".join(p if isinstance(p, bytes) else p.numpy().tobytes() for p in parts)


@pytest.mark.parametrize("staging", [ALIGN, 8192, 1 << 20])
@pytest.mark.parametrize("direct", [True, False])
def test_the_file_holds_exactly_the_bytes_written(tmp_path, staging, direct):
    parts = pieces()
    used = write(tmp_path / "shard", parts, staging, direct)
    if not direct:
        assert used is False
    assert (tmp_path / "shard").read_bytes() == expected(parts)


def test_refused_at_open_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & shard_file.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(shard_file, "O_DIRECT", shard_file.O_DIRECT or 0o40000)
    monkeypatch.setattr(os, "open", no_direct)
    parts = pieces(1)
    assert write(tmp_path / "shard", parts) is False
    assert (tmp_path / "shard").read_bytes() == expected(parts)


@pytest.mark.skipif(shard_file.O_DIRECT == 0, reason="no O_DIRECT on this platform")
def test_refused_at_the_first_write_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    real_pwrite, refused = os.pwrite, []

    def refuse_direct(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & shard_file.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    parts = pieces(2)
    f = ShardFile(str(tmp_path / "shard"), len(expected(parts)), staging_buffer(8192))
    opened_direct = f.direct
    for p in parts:
        f.write(p if isinstance(p, bytes) else memoryview(p.numpy()))
    f.close()
    assert f.direct is False and (refused == [0] or not opened_direct)
    assert (tmp_path / "shard").read_bytes() == expected(parts)


def test_a_short_shard_is_an_error_not_a_truncated_file(tmp_path):
    f = ShardFile(str(tmp_path / "shard"), 10_000, staging_buffer(8192))
    f.write(b"x" * 9_000)
    with pytest.raises(RuntimeError, match="9000 bytes of 10000"):
        f.close()


def test_other_write_errors_propagate(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    f = ShardFile(str(tmp_path / "shard"), 3 * 8192, staging_buffer(8192))
    with pytest.raises(OSError) as e:
        f.write(b"y" * (3 * 8192))
    assert e.value.errno == errno.ENOSPC
    f.close(failed=True)


def test_a_disk_too_full_for_the_shard_is_found_at_open_and_leaves_nothing_open(tmp_path, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(OSError) as e:
        ShardFile(str(tmp_path / "shard"), 1 << 20, staging_buffer(8192))
    assert e.value.errno == errno.ENOSPC
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) == before
