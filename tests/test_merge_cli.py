"""`fusedmerge merge`: mergekit-style configurations on synthetic Llama-shaped checkpoints — results equal to
the in-memory ops and (linear, task arithmetic) to mergekit's up to bf16 rounding, bit-identical files for
any memory budget and torchrun world size, bounded resident memory, and safe failure."""

import errno
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

import fusedmerge
from conftest import load_model_dir as load
from fusedmerge import cli
from fusedmerge.checkpoint import output
from fusedmerge.checkpoint.model_dir import ModelDir
from fusedmerge.checkpoint.safetensors import write_file
from fusedmerge.opcm import ContinualMerger
from fusedmerge.synthetic import llama_shapes, write_checkpoint

SHAPES = llama_shapes(hidden=64, layers=2, intermediate=128, vocab=96)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    write_checkpoint(str(root / "base"), SHAPES, shard_size=60_000)
    for i in range(3):
        write_checkpoint(str(root / f"m{i}"), SHAPES, i, shard_size=60_000)
    return root


def config(root, method, *, base=True, extra="", weights=(1.0, 0.5, 2.0), density=None, dtype="bfloat16"):
    lines = [f"merge_method: {method}"]
    if base:
        lines.append(f"base_model: {root / 'base'}")
    lines.append("models:")
    for i, w in enumerate(weights):
        params = ", ".join(([f"weight: {w}"] if w is not None else []) +
                           ([f"density: {density}"] if density is not None else []))
        lines += [f"  - model: {root / f'm{i}'}"] + ([f"    parameters: {{{params}}}"] if params else [])
    if dtype:
        lines.append(f"dtype: {dtype}")
    text = "\n".join(lines) + "\n" + extra
    path = root / f"{method}-{abs(hash(text))}.yml"
    path.write_text(text)
    return str(path)


def merge(cfg, out, *args):
    return cli.main(["merge", cfg, str(out), "--quiet", *args])


def state_dicts(root):
    return load(root / "base"), [load(root / f"m{i}") for i in range(3)]


W = [1.0, 0.5, 2.0]
IN_MEMORY = {
    "linear": lambda b, ms: fusedmerge.average(ms, W, out_dtype=torch.bfloat16),
    "task_arithmetic": lambda b, ms: fusedmerge.task_arithmetic(b, ms, 0.7, weights=W, out_dtype=torch.bfloat16),
    "ties": lambda b, ms: fusedmerge.ties(b, ms, density=0.3, weights=W, scaling=0.7, merge="mean",
                                          out_dtype=torch.bfloat16),
    "dare_linear": lambda b, ms: fusedmerge.dare(b, ms, 1 - 0.3, weights=W, scaling=0.7, rescale="l1", seed=5,
                                                 out_dtype=torch.bfloat16),
    "dare_ties": lambda b, ms: fusedmerge.ties(b, ms, dare_p=1 - 0.3, weights=W, scaling=0.7, merge="sum", seed=5,
                                               out_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("method", list(IN_MEMORY))
def test_each_method_equals_the_in_memory_op_for_any_budget(ckpts, tmp_path, method):
    extra = "parameters: {lambda: 0.7}\nseed: 5\n" if method != "linear" else ""
    cfg = config(ckpts, method, base=method != "linear", extra=extra,
                 density=0.3 if method in ("ties", "dare_linear", "dare_ties") else None)
    assert merge(cfg, tmp_path / "small", "--memory-budget", "40KB", "--shard-size", "50KB") == 0
    assert merge(cfg, tmp_path / "large", "--memory-budget", "1GB", "--shard-size", "50KB") == 0
    assert filecmp.dircmp(tmp_path / "small", tmp_path / "large").diff_files == []
    base, models = state_dicts(ckpts)
    want = IN_MEMORY[method](base, models)
    got = load(tmp_path / "small")
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    index = json.loads((tmp_path / "small" / output.INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(want)
    for name in ("config.json", "tokenizer_config.json", "README.md"):
        assert (tmp_path / "small" / name).exists()
    assert method in (tmp_path / "small" / "README.md").read_text()


def test_buffered_writes_give_the_same_files_without_o_direct(ckpts, tmp_path, monkeypatch):
    """Shards go through O_DIRECT where the file system takes it (checkpoint/shard_file.py); --buffered-writes
    opens no file with O_DIRECT, and both give the same files, whatever the staging buffer's size."""
    from fusedmerge.checkpoint import shard_file

    real_open, direct = os.open, []

    def spy(path, flags, *args):
        direct.append(bool(flags & shard_file.O_DIRECT) and shard_file.O_DIRECT != 0)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", spy)
    cfg = config(ckpts, "task_arithmetic", extra="parameters: {lambda: 0.7}\n")
    assert merge(cfg, tmp_path / "direct", "--memory-budget", "40KB", "--shard-size", "50KB") == 0
    assert any(direct) == (shard_file.O_DIRECT != 0)
    direct.clear()
    assert merge(cfg, tmp_path / "buffered", "--shard-size", "50KB", "--buffered-writes") == 0
    assert direct and not any(direct)
    shards = sorted(f for f in os.listdir(tmp_path / "direct") if f.endswith(".safetensors"))
    assert len(shards) > 1 and filecmp.dircmp(tmp_path / "direct", tmp_path / "buffered").diff_files == []


def test_seed_option_changes_the_dare_masks_and_nothing_else(ckpts, tmp_path):
    cfg = config(ckpts, "dare_linear", density=0.5)
    assert merge(cfg, tmp_path / "a") == 0 and merge(cfg, tmp_path / "b") == 0 and merge(cfg, tmp_path / "c", "--seed", "9") == 0
    a, b, c = load(tmp_path / "a"), load(tmp_path / "b"), load(tmp_path / "c")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_opcm_over_an_ordered_list_equals_the_continual_merger(ckpts, tmp_path):
    cfg = config(ckpts, "opcm", extra="parameters: {alpha: 0.4}\n", dtype=None, weights=(None, None, None))
    assert merge(cfg, tmp_path / "out") == 0
    base, models = state_dicts(ckpts)
    merger = ContinualMerger(base, 0.4)
    for m in models:
        merger.add(m)
    want, got = merger.merged(), load(tmp_path / "out")
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_equals_mergekit_up_to_bf16_rounding(ckpts, tmp_path, method):
    """mergekit's linear accumulates in fp32 (one bf16 rounding of the result: within one ulp); its task
    arithmetic runs in bf16, rounding each of its ~6 steps: within a bf16 ulp of the result plus two ulps of
    the magnitudes it sums."""
    pytest.importorskip("mergekit")
    extra = "parameters: {lambda: 0.7}\n" if method == "task_arithmetic" else ""
    cfg = config(ckpts, method, base=method != "linear", extra=extra)
    assert merge(cfg, tmp_path / "fused") == 0
    run = subprocess.run(["mergekit-yaml", cfg, str(tmp_path / "mk")], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got, want = load(tmp_path / "fused"), load(tmp_path / "mk")
    base, models = state_dicts(ckpts)
    assert set(got) == set(want)
    for k in want:
        a, b = got[k].float(), want[k].float()
        x0 = base[k].float()
        if method == "linear":
            terms = sum(w * m[k].float().abs() for w, m in zip(W, models)) / sum(W)
        else:
            terms = x0.abs() + sum(w * (m[k].float() - x0).abs() for w, m in zip(W, models))
        bound = torch.maximum(a.abs(), b.abs()) * 2.0**-7 + (terms * 2.0**-6 if method != "linear" else 1e-9)
        assert ((a - b).abs() <= bound).all(), k


def _tree(path):
    return {p: (path / p).read_bytes() for p in sorted(os.listdir(path))}


def test_torchrun_world_sizes_one_and_two_write_identical_files(ckpts, tmp_path):
    cfg = config(ckpts, "dare_ties", density=0.4, extra="seed: 3\n")
    outs = []
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k), "--master-port",
               str(29500 + k + os.getpid() % 1000), "-m", "fusedmerge", "merge", cfg, str(out), "--quiet",
               "--shard-size", "40KB"]
        run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        outs.append(_tree(out))
    assert len([n for n in outs[0] if n.endswith(".safetensors")]) >= 2
    assert outs[0] == outs[1]


def _peak_rss_mb(code):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code], env=ENV, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert after >= before
    return after / 1024


def test_peak_memory_follows_the_budget_not_the_model_size(tmp_path):
    """Four checkpoints of ~55 MB (220 MB to read) merged with a 16 MB budget: the merge's peak resident
    memory stays within the budget plus a fixed allowance above the interpreter's own."""
    shapes = llama_shapes(hidden=512, layers=8, intermediate=1024, vocab=8000)
    write_checkpoint(str(tmp_path / "base"), shapes)
    for i in range(3):
        write_checkpoint(str(tmp_path / f"m{i}"), shapes, i)
    total = sum(os.path.getsize(tmp_path / d / f) for d in ("base", "m0", "m1", "m2")
                for f in os.listdir(tmp_path / d) if f.endswith(".safetensors"))
    assert total > 200e6
    cfg = config(tmp_path, "task_arithmetic")
    idle = _peak_rss_mb("import fusedmerge.cli, fusedmerge.checkpoint.merge, torch; torch.ones(1).add_(1)")
    busy = _peak_rss_mb(f"from fusedmerge import cli; raise SystemExit(cli.main(['merge', {cfg!r}, "
                        f"{str(tmp_path / 'out')!r}, '--memory-budget', '16MB', '--quiet']))")
    assert (tmp_path / "out" / output.INDEX).exists()
    assert busy - idle < 16 + 40, f"peak {busy:.0f} MB vs {idle:.0f} MB idle, inputs {total / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------------------------------
# Safety and errors: nothing half-written
# ---------------------------------------------------------------------------------------------------------


def _only(tmp_path, *names):
    return sorted(os.listdir(tmp_path)) == sorted(names)


def test_existing_output_is_refused_unless_overwrite(ckpts, tmp_path, capsys):
    cfg = config(ckpts, "task_arithmetic")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert merge(cfg, out) == 1
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert merge(cfg, out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / output.INDEX).exists()
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not the temporary directory's private mode


def test_a_failure_mid_merge_leaves_no_output_and_says_why(ckpts, tmp_path, monkeypatch, capsys):
    cfg = config(ckpts, "task_arithmetic")
    calls = []

    def full_disk(self, key, t):
        calls.append(key)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, key, t)

    original = output.ShardWriter.write
    monkeypatch.setattr(output.ShardWriter, "write", full_disk)
    assert merge(cfg, tmp_path / "out", "--shard-size", "20KB") == 1
    assert "disk is full" in capsys.readouterr().err
    assert _only(tmp_path)  # neither OUT_DIR nor the temporary directory remains


def _copy(ckpts, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(ckpts / name, dst)
    return dst


def test_mismatched_architectures_are_listed(ckpts, tmp_path, capsys):
    bad = _copy(ckpts, tmp_path, "m1")
    sd = load(bad)
    sd.pop("model.norm.weight")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :-1].contiguous()
    sd["model.extra.weight"] = torch.ones(3)
    for f in os.listdir(bad):
        if f.endswith(".safetensors") or f.endswith(".json"):
            os.remove(bad / f)
    write_file(str(bad / "model.safetensors"), sd)
    cfg = config(ckpts, "task_arithmetic")
    path = tmp_path / "bad.yml"
    path.write_text(open(cfg).read().replace(str(ckpts / "m1"), str(bad)))
    assert merge(str(path), tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "missing keys" in err and "model.norm.weight" in err
    assert "unexpected keys" in err and "model.extra.weight" in err
    assert "shape mismatches" in err and "up_proj" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["karcher", "task_arithmetic"])
def test_a_mismatched_model_is_named_as_the_configuration_lists_it(ckpts, tmp_path, capsys, method):
    """The second listed model (models[1]) lacks a tensor: the error names models[1], also for karcher, whose
    base_model is one more input ahead of the listed models."""
    bad = _copy(ckpts, tmp_path, "m1")
    sd = load(bad)
    sd.pop("model.norm.weight")
    for f in os.listdir(bad):
        if f.endswith(".safetensors") or f.endswith(".json"):
            os.remove(bad / f)
    write_file(str(bad / "model.safetensors"), sd)
    path = tmp_path / "bad.yml"
    path.write_text(open(config(ckpts, method, weights=(None, None) if method == "karcher" else (1.0, 0.5)))
                    .read().replace(str(ckpts / "m1"), str(bad)))
    assert merge(str(path), tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"models[1] ({bad})" in err and "models[0]" not in err and "models[2]" not in err
    assert not (tmp_path / "out").exists()


def test_truncated_shard_and_escaping_shard_names_are_refused(ckpts, tmp_path, capsys):
    bad = _copy(ckpts, tmp_path, "m0")
    shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[-1]
    data = (bad / shard).read_bytes()
    (bad / shard).write_bytes(data[: len(data) - 100])
    path = tmp_path / "t.yml"
    path.write_text(open(config(ckpts, "task_arithmetic")).read().replace(str(ckpts / "m0"), str(bad)))
    assert merge(str(path), tmp_path / "out") == 1
    assert "truncated" in capsys.readouterr().err and not (tmp_path / "out").exists()

    index = json.loads((bad / output.INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (bad / output.INDEX).write_text(json.dumps(index))
    assert merge(str(path), tmp_path / "out") == 1
    assert "escapes the model directory" in capsys.readouterr().err


def test_ties_takes_per_model_densities_and_mergekits_default_of_one(ckpts, tmp_path):
    text = open(config(ckpts, "ties", density=0.3)).read().replace("density: 0.3}", "}", 1)
    text = text.replace("weight: 0.5, density: 0.3", "weight: 0.5, density: 0.6")
    path = tmp_path / "t.yml"
    path.write_text(text)
    assert merge(str(path), tmp_path / "out") == 0
    base, models = state_dicts(ckpts)
    want = fusedmerge.ties(base, models, density=[1.0, 0.6, 0.3], weights=W, merge="mean", out_dtype=torch.bfloat16)
    got = load(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_shards_linked_from_elsewhere_are_read_like_a_hugging_face_cache(ckpts, tmp_path):
    """Hub snapshots link their files to blobs/ outside the snapshot folder: allowed; only names that
    lead outside are refused."""
    snapshot, blobs = tmp_path / "snapshots" / "rev", tmp_path / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in os.listdir(ckpts / "m0"):
        shutil.copy(ckpts / "m0" / f, blobs / f)
        os.symlink(blobs / f, snapshot / f)
    got, want = load(snapshot), load(ckpts / "m0")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bin_weights_load_without_unpickling_code(ckpts, tmp_path):
    binned = tmp_path / "m2"
    binned.mkdir()
    torch.save(load(ckpts / "m2"), binned / "pytorch_model.bin")
    shutil.copy(ckpts / "m2" / "config.json", binned)
    cfg = config(ckpts, "task_arithmetic")
    path = tmp_path / "b.yml"
    path.write_text(open(cfg).read().replace(str(ckpts / "m2"), str(binned)))
    assert merge(str(path), tmp_path / "from_bin") == 0 and merge(cfg, tmp_path / "from_st") == 0
    assert _tree(tmp_path / "from_bin") .keys() == _tree(tmp_path / "from_st").keys()
    a, b = load(tmp_path / "from_bin"), load(tmp_path / "from_st")
    assert all(torch.equal(a[k], b[k]) for k in a)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, binned / "pytorch_model.bin")
    with pytest.raises(Exception, match="weights_only"):
        ModelDir(str(binned))


@pytest.mark.parametrize("text, message", [
    ("merge_method: ram\nmodels: [{model: a}]\n", "not supported"),  # mergekit has it; fusedmerge not yet
    ("merge_method: dare_ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}, "
     "{model: c, parameters: {density: 0.4}}]\n", "densities differ"),
    ("merge_method: opcm\nbase_model: b\nmodels: [{model: a, parameters: {weight: 2}}]\n", "unsupported key"),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a, parameters: {density: 0.5}}]\n",
     "unsupported key"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\nparameters: {normalize: 'false'}\n", "true or false"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {gamma: 1}}]\n", "unsupported key"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]\ntokenizer_source: union\n", "tokenizer surgery"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: [1, {filter: mlp, value: 1}]}}]\n",
     "models[0].parameters.weight: a list must hold"),
    ("merge_method: task_arithmetic\nmodels: [{model: a}]\n", "needs a base_model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 0}}]\n", "density"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: int8\n", "dtype"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: a, parameters: {weight: 2}}]\n",
     "duplicate merge inputs"),
    ("merge_method: task_arithmetic\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\n", "needs a base_model"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1e-3x}}]\n", "must be a number"),
    ("merge_method: linear\nmodels: [{model: a+lora}]\n", "LoRA"),
    ("merge_method: [oops\n", "not valid YAML"),
    ("models: [{model: a, parameters: {weight: 1}}]\n", "merge_method is missing"),
    ("merge_method: ties\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n", "given twice"),
])
def test_bad_configurations_are_refused_with_the_reason(tmp_path, capsys, text, message):
    path = tmp_path / "c.yml"
    path.write_text(text)
    assert merge(str(path), tmp_path / "out") == 2
    assert message in capsys.readouterr().err
    assert _only(tmp_path, "c.yml")


@pytest.mark.parametrize("method", ["ties", "nuslerp", "linear"])
def test_a_weight_left_out_is_refused_where_mergekit_requires_it(ckpts, tmp_path, capsys, method):
    weights = (None, 0.5) if method != "ties" else (None, 0.5, 2.0)
    assert merge(config(ckpts, method, base=method == "ties", weights=weights), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{method} needs a weight for {ckpts / 'm0'}" in err and "mergekit requires it" in err
    assert not (tmp_path / "out").exists()


def test_out_dir_parents_are_created_as_mergekit_does(ckpts, tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    assert merge(config(ckpts, "task_arithmetic"), out) == 0
    assert (out / "model.safetensors.index.json").exists() or any(out.glob("*.safetensors"))


@pytest.mark.parametrize("content, message", [(None, "has no config.json"), ("{not json", "not a readable JSON"),
                                              ("[1, 2]", "must hold a JSON object")])
def test_a_reference_model_without_a_usable_config_json_is_refused(ckpts, tmp_path, capsys, content, message):
    """The output's config.json is the base's: a missing or broken one is refused before anything is merged."""
    root = tmp_path / "models"
    shutil.copytree(ckpts, root)
    (root / "base" / "config.json").unlink()
    if content is not None:
        (root / "base" / "config.json").write_text(content)
    assert merge(config(root, "task_arithmetic"), tmp_path / "out") == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_refused(ckpts, tmp_path, capsys):
    assert merge(config(ckpts, "task_arithmetic"), tmp_path / "out", "--device", "cuda") == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert merge(config(ckpts, "task_arithmetic"), tmp_path / "out", "--device", "tpu") == 2
    assert "--device must be" in capsys.readouterr().err
    assert _only(tmp_path)


def test_python_dash_m_entry_point(ckpts, tmp_path):
    run = subprocess.run([sys.executable, "-m", "fusedmerge", "merge", config(ckpts, "linear", base=False),
                          str(tmp_path / "out")], env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "tensors" in run.stderr and "MB/s" in run.stderr
    assert (tmp_path / "out" / output.INDEX).exists()
