"""Row-blocked merging (checkpoint/blocks.py, methods/_spec.py RowBlocks): a tensor larger than half the
memory budget is merged in blocks with the same bits as whole, and peak memory follows the budget."""

import filecmp
import os
import subprocess
import sys

import pytest
import torch

from conftest import CPU_BACKENDS
from fusedmerge import cli, dispatch
from fusedmerge.checkpoint import merge, output
from fusedmerge.checkpoint.blocks import block_stats, merge_tensor, spans
from fusedmerge.checkpoint.safetensors import write_file
from fusedmerge.methods import CONFIG_METHODS, GroupCall, _reduce
from fusedmerge.philox import drop_threshold
from fusedmerge.reductions import DotsJob, DotsSpec, gram_pairs
from fusedmerge.reference import CombineJob, TiesSpec, UniformsJob

METHODS = {  # name: (method, models, global parameters, per-model parameters)
    "linear": ("linear", 3, "", "weight: 0.7"),
    "task_arithmetic": ("task_arithmetic", 3, "lambda: 0.8", "weight: 0.7"),
    "dare_linear": ("dare_linear", 3, "lambda: 0.9", "weight: 0.7, density: 0.6"),
    "ties": ("ties", 3, "lambda: 0.9", "weight: 0.7, density: 0.3"),
    "ties_rescaled": ("ties", 3, "rescale: true", "weight: 0.7, density: 0.3"),
    "dare_ties": ("dare_ties", 3, "", "weight: 0.7, density: 0.5"),
    "slerp": ("slerp", 1, "t: 0.3", ""),
    "model_stock": ("model_stock", 3, "", ""),
    "model_stock_rows": ("model_stock", 3, "filter_wise: true", ""),
    "nearswap": ("nearswap", 1, "t: 0.01", ""),
    "passthrough": ("passthrough", 1, "", "scale: 0.7"),
    "nuslerp": ("nuslerp", 2, "", "weight: 0.7"),
    "nuslerp_rows": ("nuslerp", 2, "nuslerp_flatten: false", "weight: 0.7"),
    "multislerp": ("multislerp", 3, "", "weight: 0.7"),
    "karcher": ("karcher", 3, "", ""),
    "della": ("della", 2, "lambda: 0.9", "weight: 0.7, density: 0.4, epsilon: 0.2"),
    "della_linear": ("della_linear", 2, "rescale: false", "weight: 1.0, density: 0.6"),
    "breadcrumbs": ("breadcrumbs", 2, "rescale: true", "weight: 0.7, density: 0.5, gamma: 0.1"),
    "breadcrumbs_ties": ("breadcrumbs_ties", 2, "lambda: 0.9", "weight: 0.7, density: 0.3"),
    "arcee_fusion": ("arcee_fusion", 1, "", ""),
    "sce": ("sce", 3, "select_topk: 0.3", ""),
}
WHOLE = {"tsv_m", "iso_c", "iso_cts", "magmax", "wudi"}  # merged whole (blocks=None)


def test_every_method_is_blocked_or_declared_whole():
    """No method is left out of the equality test below silently: each config method either has row blocks
    (and a METHODS entry) or is listed in WHOLE (or merges the whole model at once)."""
    blocked = {c.name for c in CONFIG_METHODS.values() if c.blocks is not None}
    assert blocked == {m for m, *_ in METHODS.values()}
    assert {c.name for c in CONFIG_METHODS.values() if c.blocks is None and not c.whole_model} == WHOLE


def _config(root, name):
    method, n, params, model_params = METHODS[name]
    base = CONFIG_METHODS[method].needs_base
    lines = [f"merge_method: {method}"] + ([f"base_model: {root / 'base'}"] if base else []) + ["models:"]
    for i in range(n):
        lines += [f"  - model: {root / f'm{i}'}"] + ([f"    parameters: {{{model_params}}}"] if model_params else [])
    lines += ([f"parameters: {{{params}}}"] if params else []) + ["seed: 5"]
    path = root / f"{name}.yml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors") or f.endswith(".json"))


def test_spans_cover_the_tensor_in_aligned_blocks():
    parts = spans((40, 33), per_element=10, limit=1000, align=128)
    assert [p.first for p in parts] == list(range(0, 1320, 128))
    assert sum(p.numel for p in parts) == 1320 and parts[-1].numel == 1320 - 1280
    assert [p.numel for p in spans((7,), per_element=10, limit=5, align=3)] == [3, 3, 1]  # at least one unit


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_a_block_draws_the_whole_tensors_masks(backend):
    """A job whose `first` is 384 draws the DARE masks of elements 384.. of the whole tensor: its combine,
    DARE-TIES and L1 buckets equal the whole tensor's (the buckets: summed with the first block's), and so do
    its uniforms (DELLA)."""
    torch.manual_seed(0)
    n, first, keys, T = 1000, 384, [11, 12], drop_threshold(0.5)
    base, xs = torch.randn(n), [torch.randn(n) for _ in keys]
    tail = lambda t: t[first:]  # noqa: E731
    whole, part = torch.empty(n), torch.empty(n - first)
    dispatch.run("combine", [CombineJob(whole, xs, [1.0, 2.0], base, T, keys)], backend)
    dispatch.run("combine", [CombineJob(part, [tail(x) for x in xs], [1.0, 2.0], tail(base), T, keys, first)], backend)
    assert torch.equal(part, tail(whole))
    spec = lambda size: TiesSpec([1.0, 0.5], 0.9, [[size] * 2], drop_threshold=T, drop_rescale=2.0, keys=[keys])  # noqa: E731
    dispatch.run("ties", [CombineJob(whole, xs, [1.0, 0.5], base)], backend, spec(n))
    dispatch.run("ties", [CombineJob(part, [tail(x) for x in xs], [1.0, 0.5], tail(base), first=first)], backend,
                 spec(n - first))
    assert torch.equal(part, tail(whole))
    buckets = lambda a, b, f: dispatch.run(  # noqa: E731
        "l1_buckets", [CombineJob(base[a:b], [x[a:b] for x in xs], [1.0, 1.0], base[a:b], T, keys, f)], backend)[0]
    assert torch.equal(buckets(0, first, 0) + buckets(first, n, first), buckets(0, n, 0))
    words = [UniformsJob(keys[0], torch.empty(size, dtype=torch.int32), n - size) for size in (n, n - first)]
    dispatch.run("uniforms", words, backend)  # DELLA's uniforms
    assert torch.equal(words[1].out, tail(words[0].out))


@pytest.mark.parametrize("backend", ["torch", *CPU_BACKENDS])
def test_dots_sums_gathered_over_blocks_have_the_whole_tensors_bits(backend, monkeypatch):
    """reduce_blocks (SLERP, Model Stock): per tensor, the chunk sums of blocks of 2 chunks (the last one
    short), reduced at the end, equal one dots over the whole tensor bit for bit; per row, whole rows per
    block give each row's sums. Magnitudes spread over 10⁶ so that another order of summation shows."""
    monkeypatch.setattr(_reduce, "BLOCK_CHUNK", 128)
    torch.manual_seed(0)
    shape = (37, 29)
    base, xs = torch.randn(shape), [torch.randn(shape) * 1e3**k for k in range(3)]
    spec = lambda n: DotsSpec(gram_pairs(n))  # noqa: E731
    for per_row in (False, True):
        blocks = _reduce.reduce_blocks(spec, lambda call: call.block()[:0:-1], lambda call: per_row, None)
        step, total = blocks.passes[0], None
        parts = spans(shape, 4, 4 * 300, blocks.align(shape, None))
        assert len(parts) >= 4
        for span in parts:
            cut = lambda t: {"w": t.reshape(-1)[span.first:span.first + span.numel]}  # noqa: E731
            call = GroupCall(cut(base), [cut(x) for x in xs], [1.0] * 3, [None] * 3, {}, backend=backend)
            partial = step.partial(call, span, None)
            total = partial if total is None else step.combine(total, partial)
        want = dispatch.run("dots", [DotsJob(xs, base, shape[0] if per_row else 1)], backend, spec(3))[0]
        assert torch.equal(step.finish(total, None), want)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_blocked_merge_equals_whole(small_llama_ckpts, tmp_path, method, monkeypatch):
    """A budget of 32 KB (16 KB for two models, 12 KB for one) sends the MLP weights (16 KB of inputs and output
    or more) in blocks of a few hundred elements (aligned as the method asks); the output files equal those
    of a budget that holds the whole model. SLERP's and Model Stock's per-tensor sums are gathered over
    chunks of _reduce.BLOCK_CHUNK elements (2**16), made small here so that their reductions span several
    blocks."""
    assert CONFIG_METHODS[METHODS[method][0]].blocks is not None
    monkeypatch.setattr(_reduce, "BLOCK_CHUNK", 256)
    cfg = _config(small_llama_ckpts, method)
    blocked = []

    def counted(key, *args):
        for block in merge_tensor(key, *args):
            blocked.append(key)
            yield block

    monkeypatch.setattr(merge, "merge_tensor", counted)
    outs = []
    sources = METHODS[method][1] + CONFIG_METHODS[METHODS[method][0]].needs_base
    for budget in ("1GB", {1: "12KB", 2: "16KB"}.get(sources, "32KB")):
        out = tmp_path / budget
        assert cli.main(["merge", cfg, str(out), "--quiet", "--memory-budget", budget]) == 0
        outs.append(out)
    assert len(set(blocked)) >= 6 and all(blocked.count(k) >= 2 for k in blocked)  # the MLP's, at least
    names = _files(outs[0])
    assert names == _files(outs[1]) and any(n.endswith(".safetensors") for n in names)
    match, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)
    assert not mismatch and not errors


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's peak-RSS reset")
def test_peak_memory_stays_within_budget_for_a_tensor_four_times_larger(tmp_path):
    """One 16 MB bf16 embedding (per model; 4 models and the output: 80 MB of that tensor) merged with a
    4 MB budget: the merge's peak RSS stays within the budget plus the allowance the streaming RSS test
    grants (merged whole it adds 83 MB). The peak is reset after the imports (/proc/self/clear_refs), whose
    own transient peak would hide the merge's."""
    for i, name in enumerate(("base", "m0", "m1", "m2")):
        os.mkdir(tmp_path / name)
        write_file(str(tmp_path / name / "model.safetensors"),
                   {"model.embed_tokens.weight": torch.full((4096, 2048), i / 8, dtype=torch.bfloat16),
                    "model.norm.weight": torch.ones(2048, dtype=torch.bfloat16)})
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    budget_mb = 4
    assert 4096 * 2048 * 2 >= 4 * budget_mb * 1e6
    cfg, out = _config(tmp_path, "task_arithmetic"), str(tmp_path / "out")
    code = ("import torch; from fusedmerge import cli; torch.ones(1).add_(1)\n"
            "mb = lambda key: int(next(x for x in open('/proc/self/status') if x.startswith(key)).split()[1]) / 1024\n"
            "open('/proc/self/clear_refs', 'w').write('5'); before = mb('VmRSS:')\n"
            f"assert cli.main(['merge', {cfg!r}, {out!r}, '--memory-budget', '{budget_mb}MB', '--quiet']) == 0\n"
            "print(before, mb('VmHWM:'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, peak = map(float, run.stdout.split())
    assert (tmp_path / "out" / output.INDEX).exists()
    assert peak - before < budget_mb + 40, f"peak {peak:.0f} MB, {before:.0f} MB before merging"


def test_a_blocked_slice_reads_its_renumbered_sources(small_llama_ckpts, tmp_path, monkeypatch):
    """Under slices:, output layer 0 made of m0's layer 1 (passthrough, scaled): its blocks read the source
    tensors the plan names, and the files equal the whole merge's."""
    cfg = tmp_path / "slices.yml"
    cfg.write_text(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {small_llama_ckpts / 'm0'}\n"
                   "        layer_range: [1, 2]\n        parameters: {scale: 0.7}\n")
    sources = {}

    def counted(key, blocks, srcs, *args):
        sources[key] = [name for _, name in srcs]
        yield from merge_tensor(key, blocks, srcs, *args)

    monkeypatch.setattr(merge, "merge_tensor", counted)
    outs = [tmp_path / budget for budget in ("1GB", "12KB")]
    for out in outs:
        assert cli.main(["merge", str(cfg), str(out), "--quiet", "--memory-budget", out.name]) == 0
    assert sources["model.layers.0.mlp.up_proj.weight"] == ["model.layers.1.mlp.up_proj.weight"]
    names = _files(outs[0])
    assert names == _files(outs[1])
    match, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)
    assert not mismatch and not errors


def test_blocks_fit_the_budget_with_an_output_wider_than_the_inputs(small_llama_ckpts, tmp_path, monkeypatch):
    """bf16 models merged into fp32 (dtype: float32): every block's inputs, fp32 output and fp32 working copies
    fit in half the budget (the output counted at its own 4 bytes, not the inputs' 2), and the blocked files
    equal the whole merge's."""
    cfg = tmp_path / "wide.yml"
    cfg.write_text(open(_config(small_llama_ckpts, "linear")).read() + "dtype: float32\n")
    seen = []

    def counted(key, blocks, srcs, shape, out_dtype, limit, *args):
        for block in merge_tensor(key, blocks, srcs, shape, out_dtype, limit, *args):
            seen.append((block.numel() * (2 * len(srcs) + 4 + 4 * len(srcs)), limit, block.dtype))
            yield block

    monkeypatch.setattr(merge, "merge_tensor", counted)
    outs = [tmp_path / budget for budget in ("1GB", "32KB")]
    for out in outs:
        assert cli.main(["merge", str(cfg), str(out), "--quiet", "--memory-budget", out.name]) == 0
    assert len(seen) >= 6 and all(dtype == torch.float32 and held <= limit for held, limit, dtype in seen)
    names = _files(outs[0])
    match, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)
    assert not mismatch and not errors


def test_nuslerp_by_columns_merges_a_large_tensor_as_one_block(small_llama_ckpts, tmp_path, monkeypatch):
    """nuslerp's vectors along dim 0 (nuslerp_row_wise) span every row block: a tensor over the budget is one
    block (merged whole, as before), with the whole merge's files."""
    cfg = str(tmp_path / "columns.yml")
    with open(cfg, "w") as f:
        f.write(open(_config(small_llama_ckpts, "nuslerp_rows")).read().replace("false", "false, nuslerp_row_wise: true"))
    blocked = []

    def counted(key, *args):
        for block in merge_tensor(key, *args):
            blocked.append((key, block.numel()))
            yield block

    monkeypatch.setattr(merge, "merge_tensor", counted)
    outs = [tmp_path / budget for budget in ("1GB", "16KB")]
    for out in outs:
        assert cli.main(["merge", cfg, str(out), "--quiet", "--memory-budget", out.name]) == 0
    keys = [k for k, _ in blocked]
    assert len(keys) >= 6 and len(set(keys)) == len(keys) and all(n == 64 * 32 for _, n in blocked)
    names = _files(outs[0])
    match, mismatch, errors = filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("shape, rows", [((1100, 1000), 400), ((5, 40000), 2)])
def test_arcee_fusion_blocks_gather_the_whole_tensors_sample(shape, rows, monkeypatch):
    """arcee_fusion's row blocks driven directly, against the whole tensor: 1.1·10⁶ entries in 3 blocks gather
    the whole tensor's 10⁶-entry sample (indices into the whole tensor, in sample order) and merge with its
    bits; rows of 40 000 entries in blocks of 2, 2 and 1 rows: the lone row's importance has the bits of a row
    among several (torch sums a lone row of 2¹⁵ entries or more across threads, in another order)."""
    from fusedmerge.methods import arcee_fusion as af

    samples, threshold = [], af.threshold
    monkeypatch.setattr(af, "threshold", lambda sampled, backend: samples.append(sampled) or threshold(sampled, backend))
    torch.manual_seed(0)
    base = torch.randn(shape)
    x = base + 0.3 * torch.randn(shape)
    whole = af.arcee_fusion(base, [x], name="w", seed=3).reshape(-1)
    blocks = CONFIG_METHODS["arcee_fusion"].blocks
    parts = spans(shape, 4, 4 * rows * shape[1], blocks.align(shape, None))
    assert len(parts) == 3
    cut = lambda t, span: {"w": t.reshape(-1)[span.first:span.first + span.numel]}  # noqa: E731
    call = lambda span: GroupCall(cut(base, span), [cut(x, span)], [1.0], [None], {}, seed=3)  # noqa: E731
    stats = block_stats(blocks, parts, call)
    got = torch.cat([blocks.merge(call(span), span, stats)["w"] for span in parts])
    assert len(samples) == 2 and samples[0].numel() == min(whole.numel(), 10**6)
    assert torch.equal(samples[1], samples[0])
    assert torch.equal(got, whole) and 0 < int((got != base.reshape(-1)).sum()) < whole.numel() // 2
