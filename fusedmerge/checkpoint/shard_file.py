"""One output shard, written front to back with direct I/O where the file system takes it.

A buffered `write` copies every byte into the page cache, into pages the kernel must first allocate: on this
project's VMs that copy was the largest single cost of a merge (model_stock, 0.95B bf16: 3 s of the 15 s of CPU
time, `copy_folio_from_iter_atomic`), taken from the cores that merge. With O_DIRECT the disk reads the bytes
from the writer's own buffer (a few % of a core), and the merged model does not push the inputs out of the page
cache. O_DIRECT wants the memory, the file offset and the length aligned, so the bytes are gathered in an
aligned staging buffer (one memcpy, without the GIL), written a whole buffer at a time, the last block padded
and the file then truncated to its size. A file system that refuses O_DIRECT (some network and FUSE file
systems, tmpfs before Linux 6.6), at open or at the first write, gets buffered writes of the same bytes."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

ALIGN = 4096  # the largest logical block size of common disks; O_DIRECT needs memory, offsets, lengths aligned
O_DIRECT = getattr(os, "O_DIRECT", 0)


def staging_buffer(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory of `size` bytes rounded up to ALIGN, for `ShardFile`s to share."""
    return mmap.mmap(-1, max(ALIGN, -(-size // ALIGN) * ALIGN))


class ShardFile:
    """A file of `size` bytes written sequentially (`write`, then `close`); its blocks are reserved first."""

    def __init__(self, path: str, size: int, staging: mmap.mmap, direct: bool = True):
        self.path, self.size, self.staging = path, size, memoryview(staging)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(staging))
        self.direct = direct and O_DIRECT != 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | O_DIRECT, 0o644)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.offset = self.filled = 0  # file offset of the staging buffer's first byte; bytes staged
        try:
            _reserve(self.fd, size)
        except BaseException:  # a full disk: nothing is left open
            os.close(self.fd)
            raise

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            n = min(len(data), len(self.staging) - self.filled)
            if data.readonly:  # a header: small
                self.staging[self.filled:self.filled + n] = data[:n]
            else:  # ctypes calls release the GIL (a slice assignment would stall the merging thread)
                ctypes.memmove(self.base + self.filled, ctypes.addressof(ctypes.c_char.from_buffer(data)), n)
            self.filled += n
            data = data[n:]
            if self.filled == len(self.staging):
                self._flush(self.filled)

    def close(self, failed: bool = False) -> None:
        """Write what is staged (the last block padded to ALIGN, then cut off) and close; on `failed`, only close."""
        try:
            if not failed:
                end = self.offset + self.filled
                if self.filled:
                    self._flush(-(-self.filled // ALIGN) * ALIGN)
                if end != self.size:
                    raise RuntimeError(f"internal: {self.path} written to {end} bytes of {self.size}")
                os.ftruncate(self.fd, end)
        finally:
            os.close(self.fd)

    def _flush(self, length: int) -> None:
        """Write the staged bytes at `offset` (direct: the first `length`, padding included) and empty the buffer."""
        if self.direct:
            try:
                self._write_all(self.staging[:length], self.offset)
            except OSError as e:  # O_DIRECT accepted at open, refused at the write: buffered from here on
                if e.errno != errno.EINVAL:
                    raise
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~O_DIRECT)
                self.direct = False
        if not self.direct:
            self._write_all(self.staging[:self.filled], self.offset)
        self.offset += self.filled
        self.filled = 0

    def _write_all(self, data: memoryview, offset: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, offset)
            data, offset = data[n:], offset + n


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks before writing it (writes into allocated blocks are faster, and a full disk
    is found now); a file system that cannot is left to allocate as it writes."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
