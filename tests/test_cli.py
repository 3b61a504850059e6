"""The command line and README's commands."""

import pathlib
import re
import shutil
import subprocess

import pytest

from fusedmerge.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_reports_every_backend_bit_equal(capsys):
    assert main(["demo", "--model", "tiny", "--models", "3", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("average", "task_arithmetic"))]
    backends = {r[1] for r in rows}
    assert {"torch", "cpu", "copy"} <= backends
    assert all(r[-1] == "yes" for r in rows if r[1] != "copy")
    assert re.search(r"limit: [\d.]+ GB moved, [\d.]+ GB/s", out)


def test_backends_command_lists_all_four(capsys):
    assert main(["backends"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["torch", "cpu", "cuda", "triton"]


def test_bad_arguments_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--models", "0"])
    assert e.value.code == 2 and "--models" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("fusedmerge")
    assert exe, "the fusedmerge console script is not on PATH"
    done = subprocess.run([exe, "backends"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("torch")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith("pip install")]
    test_cmd = [c for c in commands if c.endswith("pytest")]
    demo_cmd = [c for c in commands if "fusedmerge demo" in c]
    assert len(test_cmd) == 1 and len(demo_cmd) == 1
    assert test_cmd[0] in (ROOT / ".ci" / "run").read_text()
