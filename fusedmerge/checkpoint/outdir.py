"""OUT_DIR safety: never write over an input, replace atomically, clean up after signals and crashes.

A merge into OUT_DIR works in `.NAME.fusedmerge-ID` beside it, owned through a lock file
`.NAME.fusedmerge-ID.lock` (JSON: OUT_DIR, the owner's pid and process start time) that the owner holds
locked (fcntl.flock) while it lives. A finished merge replaces OUT_DIR by renames: the old OUT_DIR to
`.NAME.fusedmerge-ID.old`, the new directory into place, then the old one is deleted, then the lock file.
A later run to the same OUT_DIR finds lock files that no live process holds and finishes their work:
it puts an old OUT_DIR back when the new one never arrived, and deletes the rest. Paths are derived from
the lock file's name, never read from its content, and nothing without such a lock file is touched.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterable, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(BaseException):
    """A merge stopped by SIGTERM, SIGINT or SIGHUP (a BaseException, like KeyboardInterrupt, so that
    only cleanup code sees it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """While entered (in the main thread), SIGTERM, SIGINT and SIGHUP raise Interrupted so that every
    `finally` runs; inside `held()` they wait until the block is over (used around the renames). Once the
    merged model is in place (`complete`), they no longer stop anything: the run finishes, and `late` names
    the signal that came meanwhile."""

    def __init__(self):
        self.saved, self.holding, self.pending = {}, 0, None
        self.complete, self.late = False, None

    def __enter__(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.complete:
            self.late = signal.Signals(signum).name
        elif self.holding:
            self.pending = signum
        else:
            raise Interrupted(signum)

    @contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.pending is not None:
            signum, self.pending = self.pending, None
            if self.complete:
                self.late = signal.Signals(signum).name
            else:
                raise Interrupted(signum)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def refuse_inputs(out_dir: str, inputs: Iterable[str]) -> None:
    """Refuse an OUT_DIR that is, contains or lies inside an input model directory, comparing resolved
    paths (the directories and the files in them, so that shards linked from elsewhere count too)."""
    out = os.path.realpath(out_dir)
    for path in inputs:
        real = os.path.realpath(path)
        names = os.listdir(path) if os.path.isdir(path) else []
        files = [os.path.realpath(os.path.join(path, n)) for n in names]
        if _within(out, real) or any(_within(p, out) for p in [real, *files]):
            how = "is" if out == real else "lies inside" if _within(out, real) else "contains files of"
            raise FileExistsError(f"{out_dir} {how} the input model directory {path}; choose another OUT_DIR "
                                  "(refused with or without --overwrite)")


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _remove(path: str) -> None:
    """Delete one of this merge's own paths (a directory, or what was moved aside from OUT_DIR: a link too)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _note(text: str) -> None:
    print(f"fusedmerge: {text}", file=sys.stderr, flush=True)


class Workspace:
    """The temporary directory of one merge into `out_dir`, and its lock file (see the module docstring)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        parent, name = os.path.split(out_dir)
        stem = os.path.join(parent, f".{name}.fusedmerge-{secrets.token_hex(6)}")
        self.tmp, self.old, self.lock = stem, stem + ".old", stem + ".lock"
        self.fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        pid = os.getpid()
        os.write(self.fd, json.dumps({"fusedmerge": out_dir, "pid": pid, "start": _start_time(pid)}).encode())
        os.mkdir(self.tmp, 0o700)

    def replace(self, signals: Signals, overwrite: bool) -> None:
        """Put the finished temporary directory in OUT_DIR's place by renames, signals held meanwhile; once it
        is there the merge is complete (signals.complete). Without `overwrite` only an absent or empty OUT_DIR
        is replaced (rename(2) refuses a non-empty directory, atomically), whatever appeared there since the
        start; with it, OUT_DIR's previous contents are moved aside and then deleted."""
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # created private; the result gets the usual permissions
        with signals.held():
            aside = overwrite and os.path.lexists(self.out_dir)
            if aside:
                os.rename(self.out_dir, self.old)
            try:
                os.rename(self.tmp, self.out_dir)
            except OSError as e:
                if aside:
                    os.rename(self.old, self.out_dir)
                if not overwrite and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise FileExistsError(f"{self.out_dir} was created or filled by something else during the "
                                          "merge and is left as it is; pass --overwrite to replace it") from None
                raise OSError(e.errno, f"cannot move the merged model into {self.out_dir} ({e.strerror})") from None
            signals.complete = True
        self._discard(self.old, "the previous contents of " + self.out_dir)

    def _discard(self, path: str, what: str) -> None:
        try:
            _remove(path)
        except OSError as e:
            _note(f"could not remove {what} at {path} ({e.strerror or e}); remove it by hand")

    def close(self) -> None:
        """Remove what is left (the temporary directory after a failure), then the lock file."""
        self._discard(self.tmp, "the unfinished merge")
        self._discard(self.old, "the previous contents of " + self.out_dir)
        os.unlink(self.lock)
        os.close(self.fd)


def clean_stale(out_dir: str) -> None:
    """Finish what runs into `out_dir` that died left behind: only what a lock file of fusedmerge's,
    naming this OUT_DIR and held by no live process, proves to be theirs."""
    parent, name = os.path.split(out_dir)
    pattern = re.compile(rf"\.{re.escape(name)}\.fusedmerge-([0-9a-f]{{12}})\.lock")
    for entry in sorted(os.listdir(parent or ".")):
        if not pattern.fullmatch(entry):
            continue
        lock = os.path.join(parent, entry)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its owner lives
            owner = json.loads(os.read(fd, 1 << 16) or b"null")
            if not isinstance(owner, dict) or owner.get("fusedmerge") != out_dir:
                continue
            if owner.get("start") is not None and _start_time(owner.get("pid", -1)) == owner["start"]:
                continue  # its process still runs (a lock that did not hold, as on some network filesystems)
            _recover(lock[: -len(".lock")], out_dir, owner.get("pid"))
            os.unlink(lock)
        except (OSError, ValueError):
            continue
        finally:
            os.close(fd)


def _recover(stem: str, out_dir: str, pid) -> None:
    tmp, old = stem, stem + ".old"
    if os.path.isdir(old) and not os.path.lexists(out_dir):
        os.rename(old, out_dir)
        _note(f"a run killed while replacing {out_dir} (pid {pid}) had moved its previous contents to {old}; "
              "put them back")
    for path in (tmp, old):
        if os.path.isdir(path) and not os.path.islink(path):
            _note(f"removing {path}, left by a run into {out_dir} that was killed (pid {pid})")
            shutil.rmtree(path)
