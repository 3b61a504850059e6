"""Multi-tensor sums of products (the `dots` primitive, fusedmerge/reductions.py) in Triton, driven by the
int64 table of fusedmerge/dispatch/_table.py (csrc/common/table.h) and a chunk list.

Each program takes R consecutive chunks of the list as the rows of an [R, CHUNK] tile. For chunk k =
(table row t, first element s, length n) and each pair p = (a, c)::

    u_j[e] = x_j[s + e] − b[s + e]   (fp32, fp64 when ACC_F64; x_j alone without a base; 0 for e ≥ n)
    partials[k, p] = tree(fp64(u_a[e]) · fp64(u_c[e]) for e < CHUNK)

tree: repeated reshape to [R, m/2, 2] and a sum over the last axis — each a single addition of two values,
so the adjacent pairwise tree of fusedmerge/reductions.py whatever the compiler does with the reduction.
The inputs' and the base's dtypes are compile-time constants (a launch holds one dtype combination). Launch
without FMA contraction (fp64 products of fp64 inputs round once).
"""

import triton
import triton.language as tl

from . import table as tb
from .combine import _to_acc
from .table import _BASE_PTR, _HEADER_WIDTH, _IN_PTR, _INPUT_STRIDE, BF16, F16, F32

CHUNK = 1024  # elements per program on a GPU (R·CHUNK for short rows)
CHUNK_INTERPRETER = 1 << 16
NO_BASE = -1


@triton.jit
def _load(addr, offs, mask, DT: tl.constexpr, ACC_F64: tl.constexpr):
    """[R, C] values at int64 addresses addr [R] + offs [R, C], widened exactly to fp32 (fp64 when ACC_F64)."""
    if DT == BF16:
        bits = tl.load(addr.to(tl.pointer_type(tl.uint16))[:, None] + offs, mask=mask, other=0)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DT == F16:
        x = tl.load(addr.to(tl.pointer_type(tl.float16))[:, None] + offs, mask=mask, other=0).to(tl.float32)
    elif DT == F32:
        x = tl.load(addr.to(tl.pointer_type(tl.float32))[:, None] + offs, mask=mask, other=0)
    else:  # F64
        x = tl.load(addr.to(tl.pointer_type(tl.float64))[:, None] + offs, mask=mask, other=0)
    return _to_acc(x, ACC_F64)


@triton.jit
def dots_kernel(table_ptr, chunks_ptr, pairs_ptr, partials_ptr, n_chunks, N: tl.constexpr, P: tl.constexpr,
                IN_DT: tl.constexpr, BASE_DT: tl.constexpr, ACC_F64: tl.constexpr, R: tl.constexpr,
                LOG: tl.constexpr):
    k = tl.program_id(0) * R + tl.arange(0, R).to(tl.int64)
    live = k < n_chunks
    t = tl.load(chunks_ptr + 3 * k, mask=live, other=0)
    start = tl.load(chunks_ptr + 3 * k + 1, mask=live, other=0)
    n = tl.load(chunks_ptr + 3 * k + 2, mask=live, other=0)
    row = tb.row_of(table_ptr, t, N)
    lane = tl.arange(0, 1 << LOG).to(tl.int64)
    offs = start[:, None] + lane[None, :]
    mask = lane[None, :] < n[:, None]
    if BASE_DT != -1:
        b = _load(tl.load(row + _BASE_PTR, mask=live, other=0), offs, mask, BASE_DT, ACC_F64)
    for p in range(P):
        a = tl.load(pairs_ptr + 2 * p)
        c = tl.load(pairs_ptr + 2 * p + 1)
        ua = _load(tl.load(row + _HEADER_WIDTH + _INPUT_STRIDE * a + _IN_PTR, mask=live, other=0), offs,
                   mask, IN_DT, ACC_F64)
        uc = _load(tl.load(row + _HEADER_WIDTH + _INPUT_STRIDE * c + _IN_PTR, mask=live, other=0), offs,
                   mask, IN_DT, ACC_F64)
        if BASE_DT != -1:
            ua = ua - b
            uc = uc - b
        v = ua.to(tl.float64) * uc.to(tl.float64)
        for level in tl.static_range(LOG):
            v = tl.sum(tl.reshape(v, [R, (1 << (LOG - level)) // 2, 2]), axis=2)
        tl.store(partials_ptr + k * P + p, tl.sum(v, axis=1), mask=live)  # one value per row left


def launch(table, chunks, pairs, partials, *, n_inputs, in_dtype, base_dtype, acc_f64, chunk, tile):
    """Programs of tile // chunk chunks each (at least one); every tensor is on the kernel's device. Dtypes
    are table codes (base_dtype NO_BASE without a base)."""
    rows = max(1, tile // chunk)
    n = chunks.shape[0]
    dots_kernel[(triton.cdiv(n, rows),)](table, chunks, pairs, partials, n, N=n_inputs, P=pairs.shape[0],
                                         IN_DT=in_dtype, BASE_DT=base_dtype, ACC_F64=acc_f64, R=rows,
                                         LOG=chunk.bit_length() - 1, num_warps=4, enable_fp_fusion=False)
