"""Hostile configuration values and arguments: each is refused at once with a message naming the key (exit
code 2), never a traceback; YAML that expands beyond a bound (alias bombs, recursive aliases, deep
nesting, huge files) is refused before it is built."""

import time

import pytest

from fusedmerge import cli

BIG = "9" * 400
HEAD = "merge_method: dare_linear\nbase_model: b\nmodels:\n  - model: a\n"


def bomb(levels=9):
    """A value of 10**levels nodes written in a few lines (anchors of ten aliases each)."""
    items = ["&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


CASES = {
    "400-digit weight": (HEAD + f"    parameters: {{weight: {BIG}}}\n", "models[0].parameters.weight"),
    "400-digit lambda": (HEAD + f"parameters: {{lambda: {BIG}}}\n", "parameters.lambda"),
    "400-digit shard_size": (HEAD + f"fusedmerge: {{shard_size: {BIG}}}\n", "fusedmerge.shard_size"),
    "400-digit seed": (HEAD + f"seed: {BIG}\n", "seed"),
    "5000-digit seed": (HEAD + f"seed: {'9' * 5000}\n", "cannot be read"),
    "dtype a list": (HEAD + "dtype: [bfloat16]\n", "dtype"),
    "dtype a dict": (HEAD + "dtype: {bfloat16: 1}\n", "dtype"),
    "density a dict": (HEAD + "    parameters: {density: {a: 1}}\n", "models[0].parameters.density"),
    "choice a list": ("merge_method: opcm\nbase_model: b\nmodels: [{model: a}]\nparameters: {variant: [paper]}\n",
                      "parameters.variant"),
    "unknown keys of mixed types": (HEAD + "1: x\nfoo: y\n~: z\n", "unsupported key(s) 'foo', 1, None"),
    "unknown parameters of mixed types": (HEAD + "    parameters: {1: x, foo: y, null: z}\n", "unsupported key(s)"),
    "alias bomb as weight": (HEAD + f"    parameters: {{weight: {bomb()}}}\n", "aliases are expanded"),
    "alias bomb as shard_size": (HEAD + f"fusedmerge: {{shard_size: {bomb()}}}\n", "aliases are expanded"),
    "alias bomb as seed": (HEAD + f"seed: {bomb()}\n", "aliases are expanded"),
    "recursive alias": (HEAD + "seed: &s [*s]\n", "recursive YAML alias"),
    "deep nesting": (HEAD + "seed: " + "[" * 5000 + "]" * 5000 + "\n", "cannot be read"),
    "huge file": (HEAD + "#" + "x" * (1 << 20) + "\n", "longer than"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_values_are_refused_at_once_naming_the_key(tmp_path, capsys, case):
    text, message = CASES[case]
    path = tmp_path / "c.yml"
    path.write_text(text)
    started = time.perf_counter()
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err) < 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


@pytest.mark.parametrize("option, value", [("--shard-size", BIG), ("--memory-budget", BIG), ("--seed", BIG),
                                           ("--memory-budget", "1e30TB"), ("--shard-size", "nan"),
                                           ("--memory-budget", "16"), ("--memory-budget", "999B")])
def test_hostile_command_line_values_are_refused_naming_the_option(tmp_path, capsys, option, value):
    path = tmp_path / "c.yml"
    path.write_text(HEAD)
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--quiet", option, value]) == 2
    assert option in capsys.readouterr().err


@pytest.mark.parametrize("call", [
    lambda f, t: f.average([t, t], weights=[10**400, 1]),
    lambda f, t: f.task_arithmetic(t, [t], scaling=10**400),
    lambda f, t: f.ties(t, [t], scaling=-(10**400)),
    lambda f, t: f.dare(t, [t], 0.5, weights=[10**400]),
], ids=["average weights", "task_arithmetic scaling", "ties scaling", "dare weights"])
def test_integers_beyond_floats_are_refused_by_the_api_naming_the_argument(call):
    import torch

    import fusedmerge

    with pytest.raises(ValueError, match=r"(weights|scaling) must be finite"):
        call(fusedmerge, torch.ones(3))
