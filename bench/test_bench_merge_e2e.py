"""End to end, from disk to disk: `fusedmerge merge` against `mergekit-yaml` (mergekit from PyPI, bench
extra) on synthetic Llama-shaped checkpoints of ≈ 0.95B parameters (hidden 2048, 16 layers, vocab 32000),
bf16, 500 MB shards, base + 3 models; methods linear, ties, dare_ties, model_stock, della and breadcrumbs_ties
(density 0.3; della's epsilon and breadcrumbs' gamma at mergekit's defaults), and slerp of the base and one
model with t a gradient per filter over one slice (mergekit's examples/gradient-slerp.yml). Wall time and peak
RSS of each command in one run. Issue targets on this CPU: ≥ 3× faster, ≤ ¼ of mergekit's peak RSS.

The checkpoints (≈ 7.6 GB) are generated once into $FUSEDMERGE_E2E_DIR (default /tmp/fusedmerge-e2e) and
read once before each command, so both start from the page cache; the outputs of earlier commands are deleted
first (1.9 GB each: left in the page cache they squeeze the free memory every later command's writes need).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fusedmerge.synthetic import llama_shapes, write_checkpoint

ROOT = os.environ.get("FUSEDMERGE_E2E_DIR", "/tmp/fusedmerge-e2e")
MODELS = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
RUN = """import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": code.returncode, "wall": wall, "peak_rss": peak, "err": code.stderr[-1500:]}))
"""


def checkpoints():
    done = os.path.join(ROOT, "ready")
    if not os.path.exists(done):
        shapes = llama_shapes()
        write_checkpoint(os.path.join(ROOT, "base"), shapes)
        for i in range(MODELS):
            write_checkpoint(os.path.join(ROOT, f"m{i}"), shapes, i)
        open(done, "w").close()
    return ROOT


def warm_page_cache():
    """Flushes earlier outputs to disk and reads every input shard once, so that both tools start from the
    page cache with no write-back of another run's files going on."""
    os.sync()
    for name in ["base"] + [f"m{i}" for i in range(MODELS)]:
        folder = os.path.join(ROOT, name)
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), "rb") as f:
                while f.read(64 << 20):
                    pass
    # ... and the libraries both import, which those reads may have pushed out of the cache
    subprocess.run([sys.executable, "-c", "import torch, fusedmerge\ntry:\n import mergekit.merge\nexcept ImportError:\n pass"],
                   env=ENV, check=True)


SLERP_T = """parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5"""


def config(method: str) -> str:
    """mergekit YAML for `method`: slerp is mergekit's examples/gradient-slerp.yml shape (base and one model,
    one slice over all 16 layers, t a gradient per filter); the others merge base + 3 models, density 0.3."""
    if method == "slerp":
        lines = ["slices:", "  - sources:"]
        for name in ("base", "m0"):
            lines += [f"      - model: {ROOT}/{name}", "        layer_range: [0, 16]"]
        lines += ["merge_method: slerp", f"base_model: {ROOT}/base", SLERP_T]
    else:
        lines = [f"merge_method: {method}"]
        if method != "linear":
            lines.append(f"base_model: {ROOT}/base")
        lines.append("models:")
        for i in range(MODELS):
            params = ["weight: 1.0"] if method != "model_stock" else []
            params += ["density: 0.3"] if method not in ("linear", "model_stock") else []
            lines += [f"  - model: {ROOT}/m{i}"] + ([f"    parameters: {{{', '.join(params)}}}"] if params else [])
    lines.append("dtype: bfloat16")
    path = os.path.join(ROOT, f"{method}.yml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def measure(cmd):
    """Wall time and peak RSS of `cmd`, through a fresh wrapper process (its children's peak is cmd's)."""
    out = subprocess.run([sys.executable, "-c", RUN, *cmd], env=ENV, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["rc"] == 0, result["err"]
    return result


COMMANDS = {
    "fusedmerge": lambda cfg, out: ["fusedmerge", "merge", cfg, out, "--quiet", "--overwrite"],
    "mergekit": lambda cfg, out: ["mergekit-yaml", cfg, out],
}


@pytest.mark.parametrize("impl", list(COMMANDS))
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "model_stock", "della", "breadcrumbs_ties"])
def test_merge_end_to_end(benchmark, method, impl):
    if impl == "mergekit" and shutil.which("mergekit-yaml") is None:
        pytest.skip("mergekit not installed (pip install '.[bench]')")
    checkpoints()
    cfg = config(method)
    out = os.path.join(ROOT, f"out-{method}-{impl}")
    for earlier in os.listdir(ROOT):  # every earlier output: each command starts with the same free memory
        if earlier.startswith("out-"):
            shutil.rmtree(os.path.join(ROOT, earlier), ignore_errors=True)
    warm_page_cache()
    results = []
    benchmark.group = f"e2e {method} ~0.95B bf16 base+{1 if method == 'slerp' else MODELS}"
    benchmark.pedantic(lambda: results.append(measure(COMMANDS[impl](cfg, out))), rounds=1, iterations=1)
    benchmark.extra_info.update(op=f"merge_{impl}", method=method, wall_s=round(results[0]["wall"], 2),
                                peak_rss_mb=round(results[0]["peak_rss"] / 2**20), per="e2e")
