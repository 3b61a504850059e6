"""`fusedmerge merge` never loses a model: an OUT_DIR that is, contains or lies inside an input is refused;
--overwrite replaces OUT_DIR by renames, and a run killed (SIGKILL) at any step is finished by the next
run; SIGTERM, SIGINT and SIGHUP remove the temporary directory; stale directories are removed only when a
lock file of fusedmerge's proves them stale."""

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import load_model_dir as load
from fusedmerge import cli
from fusedmerge.checkpoint import outdir, output, plan
from fusedmerge.synthetic import llama_shapes, write_checkpoint

SHAPES = llama_shapes(hidden=32, layers=1, intermediate=64, vocab=48)
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def models(tmp_path):
    """base, m0, m1 under tmp_path/models, and a task_arithmetic configuration of them."""
    root = tmp_path / "models"
    for i, name in enumerate(("base", "m0", "m1")):
        write_checkpoint(str(root / name), SHAPES, i, shard_size=20_000)
    cfg = tmp_path / "ta.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\n"
                   f"models: [{{model: {root / 'm0'}, parameters: {{weight: 1.0}}}}, "
                   f"{{model: {root / 'm1'}, parameters: {{weight: 1.0}}}}]\nparameters: {{lambda: 0.5}}\n")
    return root, str(cfg)


def digest(path):
    """Every file under `path` (following links) by relative name → sha256."""
    out = {}
    for d, _, files in os.walk(path, followlinks=True):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def leftovers(parent):
    return sorted(n for n in os.listdir(parent) if ".fusedmerge-" in n)


def merge(cfg, out, *args):
    return cli.main(["merge", cfg, str(out), "--quiet", *args])


@pytest.mark.parametrize("where", ["the input", "the inputs' parent", "inside an input", "a link to an input",
                                   "the target of an input's linked shards"])
def test_an_out_dir_that_is_contains_or_lies_inside_an_input_is_refused(models, tmp_path, capsys, where):
    root, cfg = models
    if where == "a link to an input":
        os.symlink(root / "m0", tmp_path / "link")
    if where == "the target of an input's linked shards":  # a Hugging Face cache: snapshot files link to blobs/
        blobs = tmp_path / "blobs"
        os.rename(root / "m1", blobs)
        (root / "m1").mkdir()
        for f in os.listdir(blobs):
            os.symlink(blobs / f, root / "m1" / f)
    out = {"the input": root / "m0", "the inputs' parent": root, "inside an input": root / "m0" / "merged",
           "a link to an input": tmp_path / "link", "the target of an input's linked shards": tmp_path / "blobs"}[where]
    before = digest(root)
    for args in ((), ("--overwrite",)):
        assert merge(cfg, out, *args) == 1
        assert "input model directory" in capsys.readouterr().err
    assert digest(root) == before and leftovers(out.parent) == []
    assert not (root / "m0" / "merged").exists()


def child(script, *argv, **kw):
    """A Python child process running `script` (argv after it), its output captured."""
    return subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


KILL_AT = """
import os, signal, sys
from fusedmerge import cli
from fusedmerge.checkpoint import outdir, output
step = sys.argv[3]
rename, remove = os.rename, outdir._remove
def killing_rename(src, dst):  # dies once the old OUT_DIR is aside, before the new one is in place
    rename(src, dst)
    if step == "between renames" and dst.endswith(".old"):
        os.kill(os.getpid(), signal.SIGKILL)
def killing_remove(path):  # dies halfway through deleting the old OUT_DIR
    if step == "removing the old" and path.endswith(".old") and os.path.isdir(path):
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
        os.kill(os.getpid(), signal.SIGKILL)
    remove(path)
outdir.os.rename, outdir._remove = killing_rename, killing_remove
sys.exit(cli.main(["merge", sys.argv[1], sys.argv[2], "--quiet", "--overwrite"]))
"""


def old_out_dir(path):
    path.mkdir()
    (path / "mine.txt").write_text("the previous contents")
    (path / "more.txt").write_text("more")
    return digest(path)


def test_a_kill_while_the_old_out_dir_is_removed_leaves_the_new_one_and_the_next_run_cleans_up(models, tmp_path):
    root, cfg = models
    assert merge(cfg, tmp_path / "want") == 0
    out = tmp_path / "out"
    old_out_dir(out)
    p = child(KILL_AT, cfg, out, "removing the old")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert digest(out) == digest(tmp_path / "want")  # the new output was in place before the removal began
    assert [n.rsplit(".", 1)[-1] for n in leftovers(tmp_path)] == ["lock", "old"]
    assert merge(cfg, tmp_path / "out", "--overwrite") == 0
    assert leftovers(tmp_path) == [] and digest(out) == digest(tmp_path / "want")


def test_a_kill_between_the_renames_is_undone_by_the_next_run(models, tmp_path, capsys):
    root, cfg = models
    out = tmp_path / "out"
    before = old_out_dir(out)
    p = child(KILL_AT, cfg, out, "between renames")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists() and len(leftovers(tmp_path)) == 3  # lock, the new directory, the old one aside
    assert merge(cfg, out) == 1  # without --overwrite: the old contents come back, and are kept
    err = capsys.readouterr().err
    assert "put them back" in err and "not empty" in err
    assert digest(out) == before and leftovers(tmp_path) == []


def test_a_signal_once_the_merged_model_is_in_place_lets_the_merge_finish(models, tmp_path, monkeypatch, capsys):
    """A signal while the old OUT_DIR is deleted (after the renames) neither stops the cleanup nor reports the
    merge as failed: the new model is in place."""
    root, cfg = models
    assert merge(cfg, tmp_path / "want") == 0
    out = tmp_path / "out"
    old_out_dir(out)
    remove = outdir._remove

    def signalled_remove(path):
        if path.endswith(".old"):
            os.kill(os.getpid(), signal.SIGTERM)
        remove(path)

    monkeypatch.setattr(outdir, "_remove", signalled_remove)
    capsys.readouterr()
    assert merge(cfg, out, "--overwrite") == 0
    assert "SIGTERM arrived once the merged model was in" in capsys.readouterr().err
    assert digest(out) == digest(tmp_path / "want") and leftovers(tmp_path) == []


def test_without_overwrite_an_out_dir_filled_during_the_merge_is_left_alone(models, tmp_path, monkeypatch, capsys):
    """Another program (or merge) creating OUT_DIR meanwhile: the finished merge does not replace it."""
    root, cfg = models
    out = tmp_path / "out"
    write = output.ShardWriter.write

    def racing_write(self, key, t):
        if not out.exists():
            old_out_dir(out)
        return write(self, key, t)

    monkeypatch.setattr(output.ShardWriter, "write", racing_write)
    assert merge(cfg, out) == 1
    assert "was created or filled by something else during the merge" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["mine.txt", "more.txt"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_mid_merge_removes_the_temporary_directory(models, tmp_path, monkeypatch, capsys, sig):
    root, cfg = models
    write, seen = output.ShardWriter.write, []

    def signalled_write(self, key, t):  # the signal arrives (once) while shards are being written
        seen.append(leftovers(tmp_path))
        if len(seen) == 1:
            os.kill(os.getpid(), sig)
        return write(self, key, t)

    monkeypatch.setattr(output.ShardWriter, "write", signalled_write)
    handlers = [signal.getsignal(s) for s in outdir.SIGNALS]
    assert merge(cfg, tmp_path / "out") == 128 + sig
    # the workspace and its lock file existed, then went (the main thread runs signal handlers: while it waits for
    # the writing thread, that thread finishes its group of tensors first)
    assert seen and all(len(s) == 2 for s in seen)
    assert f"stopped by {sig.name}" in capsys.readouterr().err
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    assert [signal.getsignal(s) for s in outdir.SIGNALS] == handlers  # restored


def test_a_signal_as_the_writing_thread_starts_still_waits_for_its_job(models, tmp_path, monkeypatch, capsys):
    """A signal handled just after `submit` started the writing thread, before its pool recorded it: the pool's
    shutdown does not know that thread, yet its write (already running) must end before the cleanup."""
    import threading
    import time

    root, cfg = models
    start, write, seen = threading.Thread.start, output.ShardWriter.write, []

    def start_then_signal(self):
        start(self)
        if self.name.startswith("fusedmerge-") and "-write" in self.name:
            raise outdir.Interrupted(signal.SIGTERM)

    def slow_write(self, key, t):
        time.sleep(0.2)
        seen.append(leftovers(tmp_path))
        return write(self, key, t)

    monkeypatch.setattr(threading.Thread, "start", start_then_signal)
    monkeypatch.setattr(output.ShardWriter, "write", slow_write)
    assert merge(cfg, tmp_path / "out") == 128 + signal.SIGTERM
    assert seen and all(len(s) == 2 for s in seen)  # every write before the workspace went
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("fusedmerge-")]
    assert "stopped by SIGTERM" in capsys.readouterr().err


SLOW = """
import sys, time
from fusedmerge import cli
from fusedmerge.checkpoint import output
write = output.ShardWriter.write
def slow_write(self, key, t):
    print("writing", flush=True)
    time.sleep(0.05)
    return write(self, key, t)
output.ShardWriter.write = slow_write
sys.exit(cli.main(["merge", sys.argv[1], sys.argv[2], "--quiet", "--memory-budget", "1KB"]))
"""


def test_sigterm_from_outside_removes_the_temporary_directory(models, tmp_path):
    root, cfg = models
    p = child(SLOW, cfg, tmp_path / "out")
    assert p.stdout.readline() == "writing\n"
    assert len(leftovers(tmp_path)) == 2
    p.terminate()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def lock_file(parent, token, out, owner=None, body=None):
    path = parent / f".out.fusedmerge-{token}.lock"
    text = body if body is not None else json.dumps({"fusedmerge": str(out), **(owner or {"pid": 1, "start": "0"})})
    path.write_text(text)
    (parent / f".out.fusedmerge-{token}").mkdir()
    (parent / f".out.fusedmerge-{token}" / "model-00001-of-00001.safetensors").write_bytes(b"x")
    return path


def test_only_directories_proven_stale_are_removed(models, tmp_path):
    root, cfg = models
    out = tmp_path / "out"
    alive = {"pid": os.getpid(), "start": outdir._start_time(os.getpid())}
    stale = lock_file(tmp_path, "a" * 12, out)  # its process is gone and nobody holds the lock: removed
    held = lock_file(tmp_path, "b" * 12, out)  # locked by a live process: in use
    running = lock_file(tmp_path, "c" * 12, out, alive)  # its process still runs, though unlocked
    other = lock_file(tmp_path, "d" * 12, tmp_path / "elsewhere")  # another OUT_DIR's
    garbled = lock_file(tmp_path, "e" * 12, out, body="{not json")
    (tmp_path / ".out.fusedmerge-zzzz").mkdir()  # no lock file: not provably fusedmerge's
    with open(held) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert merge(cfg, out) == 0
    assert "model.norm.weight" in load(out)
    assert not stale.exists() and not (tmp_path / stale.name[:-5]).exists()
    for lock in (held, running, other, garbled):
        assert lock.exists() and (tmp_path / lock.name[:-5]).is_dir()
    assert (tmp_path / ".out.fusedmerge-zzzz").is_dir()


def _append(path):
    with open(path, "ab") as f:
        f.write(b"\0" * 8)


def _touch(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _replace(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(f"{path}.new", "wb") as f:
        f.write(data)
    os.replace(f"{path}.new", path)


@pytest.mark.parametrize("change, message", [(_append, "changed size"), (_touch, "was modified"),
                                             (_replace, "was replaced")], ids=["grown", "rewritten", "replaced"])
def test_an_input_changed_during_the_merge_is_detected(models, tmp_path, monkeypatch, capsys, change, message):
    root, cfg = models
    shard = sorted((root / "m1").glob("*.safetensors"))[0]
    group_calls, calls = plan.Plan.calls, []

    def changing_calls(self, *args):  # in the merging thread (the writing one would race with its checks)
        calls.append(args)
        if len(calls) == 2:
            change(shard)
        return group_calls(self, *args)

    monkeypatch.setattr(plan.Plan, "calls", changing_calls)
    assert merge(cfg, tmp_path / "out", "--memory-budget", "1KB") == 1
    err = capsys.readouterr().err
    assert f"{shard} {message}" in err and "while being merged" in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
