"""Multi-tensor sums of products (the `dots` primitive, fusedmerge/reductions.py) in Triton, driven by the
int64 table of fusedmerge/dispatch/_table.py (csrc/common/table.h) and a chunk list.

For chunk k = (table row t, first element s, length n) and each pair p = (a, c)::

    u_j[e] = x_j[s + e] − b[s + e]   (fp32, fp64 when ACC_F64; x_j alone without a base; 0 for e ≥ n)
    partials[k, p] = tree(fp64(u_a[e]) · fp64(u_c[e]) for e < CHUNK)

tree: repeated reshape to [m/2, 2] and a sum over the last axis — each a single addition of two values, so
the adjacent pairwise tree of the module docstring of fusedmerge/reductions.py, whatever the compiler
does with the reduction. Launch without FMA contraction (fp64 products of fp64 inputs round once).
"""

import triton
import triton.language as tl

from . import table as tb
from .combine import _load_acc

CHUNK = 1024
CHUNK_INTERPRETER = 1 << 16


@triton.jit
def _tree(v, LOG: tl.constexpr):
    """The adjacent pairwise tree of v (2**LOG values)."""
    for level in tl.static_range(LOG):
        v = tl.sum(tl.reshape(v, [(1 << (LOG - level)) // 2, 2]), axis=1)
    return tl.sum(v, axis=0)  # one value left: its sum is itself


@triton.jit
def dots_kernel(table_ptr, chunks_ptr, pairs_ptr, partials_ptr, N: tl.constexpr, P: tl.constexpr,
                ACC_F64: tl.constexpr, LOG: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunks_ptr + 3 * pid)
    start = tl.load(chunks_ptr + 3 * pid + 1)
    n = tl.load(chunks_ptr + 3 * pid + 2)
    row = tb.row_of(table_ptr, t, N)
    lane = tl.arange(0, 1 << LOG)
    offs = start + lane.to(tl.int64)
    mask = lane < n
    base_addr = tb.base_ptr(row)
    n_base = tl.where(base_addr != 0, n, 0)  # no base: b = 0, and x − 0 = x bit for bit
    b = _load_acc(base_addr, tb.base_dtype(row), offs, lane < n_base, ACC_F64)
    for p in range(P):
        a = tl.load(pairs_ptr + 2 * p)
        c = tl.load(pairs_ptr + 2 * p + 1)
        ua = _load_acc(tb.input_ptr(row, a), tb.input_dtype(row, a), offs, mask, ACC_F64) - b
        uc = _load_acc(tb.input_ptr(row, c), tb.input_dtype(row, c), offs, mask, ACC_F64) - b
        s = _tree(ua.to(tl.float64) * uc.to(tl.float64), LOG)
        tl.store(partials_ptr + pid * P + p, s)


def launch(table, chunks, pairs, partials, *, n_inputs, acc_f64, chunk):
    """One program per chunk; every tensor is on the kernel's device."""
    dots_kernel[(chunks.shape[0],)](table, chunks, pairs, partials, N=n_inputs, P=pairs.shape[0], ACC_F64=acc_f64,
                                    LOG=chunk.bit_length() - 1, num_warps=4, enable_fp_fusion=False)
