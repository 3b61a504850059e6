"""One table layout and one set of codes: the C++ definition (csrc/common/table.h, exported as LAYOUT by
the extensions), the Python one (fusedmerge/dispatch/_table.py) and the Triton accessors
(fusedmerge/triton_kernels/table.py) agree; the bindings take named parameter structs."""

import importlib.util
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fusedmerge
from conftest import STATUS
from fusedmerge.dispatch import _table
from fusedmerge.reference import CombineJob

requires_cpu_ext = pytest.mark.skipif(not STATUS["cpu"].available, reason=STATUS["cpu"].reason)
requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _cuda_module():
    try:
        from fusedmerge import _cuda
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built here ({e})")
    return _cuda


def test_python_layout_is_consistent():
    L = _table.LAYOUT
    header = [L[k] for k in ("OUT_PTR", "OUT_DTYPE", "NUMEL", "BASE_PTR", "BASE_DTYPE", "DROP_THRESHOLD", "FIRST")]
    per_input = [L[k] for k in ("IN_PTR", "IN_DTYPE", "COEFF", "KEY")]
    assert sorted(header) == list(range(L["HEADER_WIDTH"]))
    assert sorted(per_input) == list(range(L["INPUT_STRIDE"]))
    assert _table.table_width(3) == L["HEADER_WIDTH"] + 3 * L["INPUT_STRIDE"]
    assert {torch.float32: L["F32"], torch.float16: L["F16"], torch.bfloat16: L["BF16"],
            torch.float64: L["F64"]} == _table.DTYPE_CODES
    assert _table.MERGE_CODES == {"sum": L["MERGE_SUM"], "mean": L["MERGE_MEAN"], "max": L["MERGE_MAX"]}
    assert len(set(_table.DTYPE_CODES.values())) == 4 and len(set(_table.MERGE_CODES.values())) == 3


@requires_cpu_ext
def test_cpu_extension_layout_equals_python():
    from fusedmerge import _cpu

    assert _cpu.LAYOUT == _table.LAYOUT
    assert {name: int(v) for name, v in _cpu.MergeMode.__members__.items()} == _table.MERGE_CODES


def test_cuda_extension_layout_equals_python():
    _cuda = _cuda_module()
    assert _cuda.LAYOUT == _table.LAYOUT


def test_build_table_writes_the_named_columns():
    base = torch.arange(5, dtype=torch.bfloat16)
    xs = [torch.ones(5, dtype=torch.float32), torch.ones(5, dtype=torch.float16)]
    out = torch.empty(5, dtype=torch.float64)
    table, keep = _table.build_table([CombineJob(out, xs, [0.25, -3.5], base, 1234, [7, (1 << 64) - 1])])
    row = table[0].tolist()
    assert len(row) == _table.table_width(2)
    assert row[_table.OUT_PTR] == out.data_ptr() and row[_table.OUT_DTYPE] == _table.F64
    assert row[_table.NUMEL] == 5 and row[_table.DROP_THRESHOLD] == 1234
    assert row[_table.BASE_PTR] == base.data_ptr() and row[_table.BASE_DTYPE] == _table.BF16
    for i, (x, code, c, key) in enumerate(zip(xs, (_table.F32, _table.F16), (0.25, -3.5), (7, -1))):
        assert row[_table.input_column(i, _table.IN_PTR)] == x.data_ptr()
        assert row[_table.input_column(i, _table.IN_DTYPE)] == code
        assert struct.pack("<q", row[_table.input_column(i, _table.COEFF)]) == struct.pack("<d", c)
        assert row[_table.input_column(i, _table.KEY)] == key
    no_base, _ = _table.build_table([CombineJob(out, xs, [1.0, 1.0], None, 0, None)])
    assert no_base[0, _table.BASE_PTR] == 0 and no_base[0, _table.DROP_THRESHOLD] == 0
    del keep


@requires_cpu_ext
def test_cpu_parameter_structs_are_built_by_name():
    from fusedmerge import _cpu

    t = _cpu.TableArgs(table=0, n_tensors=0, n_inputs=2)
    assert (t.table, t.n_tensors, t.n_inputs) == (0, 0, 2)
    with pytest.raises(TypeError):
        _cpu.TableArgs(0, 0, 2)  # keyword-only
    with pytest.raises(TypeError):
        _cpu.combine(table=0, n_tensors=0, n_inputs=2)  # the old positional signature is gone
    sel = _cpu.TiesSelectArgs(table=t, model_scope=True, ks=0, thresholds=0)
    assert sel.model_scope is True and sel.table.n_inputs == 2
    good = dict(table=t, thresholds=0, model_scope=False, elect_count=False, weighted_vote=True,
                merge=_cpu.MergeMode(_table.MERGE_CODES["mean"]), scaling=0.5, drop_rescale=1.0, majority_tie=True)
    args = _cpu.TiesMergeArgs(**good)
    assert args.merge == _cpu.MergeMode.mean and args.scaling == 0.5 and args.majority_tie is True
    for field, wrong in [("model_scope", 1), ("weighted_vote", 0.5), ("merge", 1), ("majority_tie", "majority"),
                         ("scaling", "0.5"), ("thresholds", 1.5)]:
        with pytest.raises(TypeError):
            _cpu.TiesMergeArgs(**{**good, field: wrong})
    # swapped values fail (pybind11 3 lets a bool or int into a double field, but not a double into a bool)
    for a, b in [("scaling", "majority_tie"), ("drop_rescale", "weighted_vote"), ("merge", "elect_count")]:
        with pytest.raises(TypeError):
            _cpu.TiesMergeArgs(**{**good, a: good[b], b: good[a]})
    with pytest.raises(ValueError):
        _cpu.TiesMergeArgs(**{**good, "merge": _cpu.MergeMode(7)})


def test_cuda_parameter_struct_is_built_by_name():
    _cuda = _cuda_module()
    t = _cuda.TableArgs(table=0, n_tensors=0, n_inputs=1)
    with pytest.raises(TypeError):
        _cuda.TableArgs(0, 0, 1)
    with pytest.raises(TypeError):
        _cuda.combine(t, 0, 0)  # total_tiles and stream are keyword-only
    _cuda.combine(t, total_tiles=0, stream=0)  # nothing to launch: returns before touching a device


def _kernel_sources():
    import fusedmerge.triton_kernels as tk

    return {p.name: p.read_text() for p in Path(tk.__file__).parent.glob("*.py")}


def test_triton_kernels_spell_no_table_offsets_or_codes():
    for name, src in _kernel_sources().items():
        assert not re.search(r"\brow\s*\+\s*\d", src), name  # offsets come from triton_kernels/table.py
        assert not re.search(r"\b(code|MERGE)\s*==\s*\d", src), name  # codes are named constants
        assert "index(spec.merge)" not in src, name


@requires_triton
def test_triton_constants_equal_python():
    from fusedmerge.triton_kernels import table as tb

    for name in ("F32", "F16", "BF16", "F64", "MERGE_SUM", "MERGE_MEAN", "MERGE_MAX"):
        assert getattr(tb, name).value == _table.LAYOUT[name], name
    for name in ("OUT_PTR", "OUT_DTYPE", "NUMEL", "BASE_PTR", "BASE_DTYPE", "DROP_THRESHOLD", "HEADER_WIDTH",
                 "IN_PTR", "IN_DTYPE", "COEFF", "KEY", "INPUT_STRIDE"):
        assert getattr(tb, "_" + name).value == _table.LAYOUT[name], name


if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl

    from fusedmerge.triton_kernels import table as tb

    @triton.jit
    def _read_rows(table_ptr, out_ptr, N: tl.constexpr):
        """Row t's entries through the accessors, densely into out[t]: header, then each input's four."""
        t = tl.program_id(0)
        row = tb.row_of(table_ptr, t, N)
        o = out_ptr + t * (7 + 4 * N)
        tl.store(o + 0, tb.out_ptr(row))
        tl.store(o + 1, tb.out_dtype(row))
        tl.store(o + 2, tb.numel(row))
        tl.store(o + 3, tb.base_ptr(row))
        tl.store(o + 4, tb.base_dtype(row))
        tl.store(o + 5, tb.drop_threshold(row))
        tl.store(o + 6, tb.first(row))
        for i in tl.static_range(N):
            tl.store(o + 7 + 4 * i, tb.input_ptr(row, i))
            tl.store(o + 8 + 4 * i, tb.input_dtype(row, i))
            tl.store(o + 9 + 4 * i, tb.coeff(row, i).to(tl.int64, bitcast=True))
            tl.store(o + 10 + 4 * i, tb.key(row, i))


@requires_triton
def test_triton_accessors_read_the_named_columns():
    """Every accessor of triton_kernels/table.py, run on a two-row table, returns the column build_table wrote."""
    if not STATUS["triton"].available:
        pytest.skip(STATUS["triton"].reason)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xs = [torch.ones(3, dtype=torch.float16), torch.ones(3, dtype=torch.float32)]
    jobs = [CombineJob(torch.empty(3, dtype=torch.bfloat16), xs, [0.5, -2.0], torch.zeros(3), 99, [5, 6], 256),
            CombineJob(torch.empty(3), xs, [1.5, 3.0], None, 0, None)]
    table, keep = _table.build_table(jobs)
    L = _table.LAYOUT
    # the same values in the order of _read_rows: header by name, then inputs by name
    order = [L["OUT_PTR"], L["OUT_DTYPE"], L["NUMEL"], L["BASE_PTR"], L["BASE_DTYPE"], L["DROP_THRESHOLD"], L["FIRST"]]
    for i in range(2):
        order += [_table.input_column(i, L[k]) for k in ("IN_PTR", "IN_DTYPE", "COEFF", "KEY")]
    expected = table[:, order]
    got = torch.zeros_like(table, device=device)
    _read_rows[(2,)](table.to(device), got, N=2)
    assert torch.equal(got.cpu(), expected)
    del keep


TRITON_GPU_COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedmerge.triton_kernels import combine, dots, ties

    P = "*i64"
    tile = dict(table_ptr=P, tile_tensor_ptr=P, tile_start_ptr=P)
    flags = ("MODEL_SCOPE", "N", "WEIGHTED", "COUNT")
    kernels = [
        (combine.combine_kernel, dict(tile, N="constexpr", ACC_F64="constexpr", BLOCK="constexpr"),
         [dict(N=2, ACC_F64=False, BLOCK=256), dict(N=2, ACC_F64=True, BLOCK=256)]),
        (combine.l1_buckets_kernel, dict(tile, buckets_ptr=P, N="constexpr", BLOCK="constexpr"),
         [dict(N=2, BLOCK=256)]),
        (ties.ties_vote_kernel, dict(tile, thr_ptr=P, sums_ptr=P, rescale="fp32", **dict.fromkeys(flags, "constexpr"),
                                     BLOCK="constexpr"),
         [dict(MODEL_SCOPE=True, N=2, WEIGHTED=True, COUNT=False, BLOCK=256)]),
        (ties.ties_merge_kernel, dict(tile, thr_ptr=P, rescale="fp32", scaling="fp32", tie_sign="fp32",
                                      **dict.fromkeys(flags, "constexpr"), MERGE="constexpr", BLOCK="constexpr"),
         [dict(MODEL_SCOPE=False, N=2, WEIGHTED=True, COUNT=True, MERGE=m, BLOCK=256) for m in range(3)]),
        (dots.dots_kernel, dict(table_ptr=P, chunks_ptr=P, pairs_ptr=P, partials_ptr="*fp64", n_chunks="i64",
                                **dict.fromkeys(("N", "P", "IN_DT", "BASE_DT", "ACC_F64", "R", "LOG"), "constexpr")),
         [dict(N=3, P=6, IN_DT=2, BASE_DT=0, ACC_F64=False, R=1, LOG=10),
          dict(N=2, P=1, IN_DT=3, BASE_DT=-1, ACC_F64=True, R=8, LOG=0)]),
    ]
    for fn, signature, variants in kernels:
        for constexprs in variants:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(enable_fp_fusion=False))
    print("compiled")
""")


@requires_triton
@pytest.mark.skipif(os.environ.get("FUSEDMERGE_SKIP_TRITON_COMPILE") == "1", reason="FUSEDMERGE_SKIP_TRITON_COMPILE=1")
def test_triton_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter does not apply the compiler's rules (constexpr-only globals, one return type): compile
    every kernel for sm_90 to PTX and cubin, which needs no GPU, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(fusedmerge.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ASTSource/GPUTarget ({e})")
    out = subprocess.run([sys.executable, "-c", TRITON_GPU_COMPILE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    if out.returncode != 0 and ("ptxas" in out.stderr and "not found" in out.stderr.lower()):
        pytest.skip("no ptxas for this triton: " + out.stderr.strip().splitlines()[-1])
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-4000:]
