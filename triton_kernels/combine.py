"""Multi-tensor linear combination with optional random drop (DARE) in Triton, driven by the int64 table
of fusedmerge/dispatch/_table.py (csrc/common/table.h), read through triton_kernels/table.py.

For each tile (tensor t, elements start..start+BLOCK) and inputs x_i of that tensor, base b, coeffs c_i,
drop threshold T and Philox keys k_i (keep_i[j] = U(k_i, j) >= T, fusedmerge/philox.py)::

    e_i = keep_i ? c_i*(x_i - b) : 0                 (no base: x_i alone; no drop when T = 0)
    acc = e_0 ; acc = acc + e_i                       (fp32 or fp64, left fold)
    out = round_to_nearest_even(b + acc)

Input, base and output dtypes are read from the table at run time (a uniform branch per tile); pointers
are int64 table entries cast with tl.pointer_type. bf16 is loaded and stored as raw uint16 bits and
rounded by hand, which is exact on GPUs and in the interpreter alike. Launch without FMA contraction.
"""

import triton
import triton.language as tl

from . import table as tb
from .table import BF16, F16, F32, F64

BLOCK = 4096
BLOCK_INTERPRETER = 1 << 16


@triton.jit
def _to_acc(x, ACC_F64: tl.constexpr):
    # One return: the compiler also generates the statements after a constexpr `if` that returns, so an early
    # return here makes two return types (fp64, fp32), which Triton 3.9 rejects when compiling for a GPU.
    if ACC_F64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _load_acc(addr, code, offs, mask, ACC_F64: tl.constexpr):
    if code == BF16:
        bits = tl.load(addr.to(tl.pointer_type(tl.uint16)) + offs, mask=mask, other=0)
        x = _to_acc((bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True), ACC_F64)
    elif code == F16:
        x = _to_acc(tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0).to(tl.float32), ACC_F64)
    elif code == F32:
        x = _to_acc(tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0), ACC_F64)
    else:  # F64
        x = _to_acc(tl.load(addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0), ACC_F64)
    return x


@triton.jit
def _store_rounded(addr, code, offs, mask, v):
    if code == F64:
        tl.store(addr.to(tl.pointer_type(tl.float64)) + offs, v.to(tl.float64), mask=mask)
    else:
        f = v.to(tl.float32)
        if code == BF16:
            bits = f.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(f != f, 0x7FC0, rounded)
            tl.store(addr.to(tl.pointer_type(tl.uint16)) + offs, rounded.to(tl.uint16), mask=mask)
        elif code == F16:
            tl.store(addr.to(tl.pointer_type(tl.float16)) + offs, f.to(tl.float16), mask=mask)
        else:  # F32
            tl.store(addr.to(tl.pointer_type(tl.float32)) + offs, f, mask=mask)


@triton.jit
def _halves(key, start, stream, BLOCK: tl.constexpr):
    """16-bit half of Philox stream `stream` for each element start..start+BLOCK (fusedmerge/philox.py; start
    a multiple of 128): call 16·g + lane gives, per group g, elements [word, half, lane]."""
    tl.static_assert(BLOCK % 128 == 0)
    n = start // 8 + tl.arange(0, BLOCK // 8).to(tl.int64)
    lo = n.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(key, lo, (n >> 32).to(tl.uint32), lo * 0 + stream, lo * 0)
    # join adds a minor axis: [i, a, b] = (w0, w2 | w1, w3)[b][a] is word 2a + b of call i
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK // 128, 16, 2, 2))
    halves = tl.join(words & 0xFFFF, words >> 16)  # [group, lane, a, b, half]
    return tl.reshape(tl.permute(halves, (0, 2, 3, 4, 1)), (BLOCK,))


@triton.jit
def _uniforms(key, start, threshold, BLOCK: tl.constexpr):
    """32-bit uniform U = (A << 16) | B of each element, for comparison with `threshold`: B (stream 1) is
    drawn only when some A equals threshold >> 16, as it cannot change the comparison elsewhere."""
    a = _halves(key, start, 0, BLOCK)
    u = a << 16
    if tl.max((a == (threshold >> 16)).to(tl.int32), axis=0) > 0:
        u = u | _halves(key, start, 1, BLOCK)
    return u


@triton.jit
def _term(row, i, b, start, offs, mask, threshold, HAS_BASE: tl.constexpr, ACC_F64: tl.constexpr,
          BLOCK: tl.constexpr):
    x = _load_acc(tb.input_ptr(row, i), tb.input_dtype(row, i), offs, mask, ACC_F64)
    if HAS_BASE:
        x = x - b
    c = tb.coeff(row, i)
    if not ACC_F64:
        c = c.to(tl.float32)
    x = x * c
    if threshold != 0:
        t32 = threshold.to(tl.uint32)
        keep = _uniforms(tb.key(row, i), tb.first(row) + start, t32, BLOCK) >= t32
        x = tl.where(keep, x, 0.0)
    return x


@triton.jit
def tile_of(table_ptr, tile_tensor_ptr, tile_start_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile: its row index t in the table, the row's address, its first element, the
    element offsets and their bounds mask."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor_ptr + pid)
    row = tb.row_of(table_ptr, t, N)
    start = tl.load(tile_start_ptr + pid)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return t, row, start, offs, offs < tb.numel(row)


@triton.jit
def combine_kernel(table_ptr, tile_tensor_ptr, tile_start_ptr, N: tl.constexpr, ACC_F64: tl.constexpr,
                   BLOCK: tl.constexpr):
    _, row, start, offs, mask = tile_of(table_ptr, tile_tensor_ptr, tile_start_ptr, N, BLOCK)
    base_addr = tb.base_ptr(row)
    threshold = tb.drop_threshold(row)
    if base_addr != 0:
        b = _load_acc(base_addr, tb.base_dtype(row), offs, mask, ACC_F64)
        acc = _term(row, 0, b, start, offs, mask, threshold, True, ACC_F64, BLOCK)
        for i in tl.static_range(1, N):
            acc = acc + _term(row, i, b, start, offs, mask, threshold, True, ACC_F64, BLOCK)
        acc = b + acc
    else:
        acc = _term(row, 0, 0.0, start, offs, mask, threshold, False, ACC_F64, BLOCK)
        for i in tl.static_range(1, N):
            acc = acc + _term(row, i, 0.0, start, offs, mask, threshold, False, ACC_F64, BLOCK)
    _store_rounded(tb.out_ptr(row), tb.out_dtype(row), offs, mask, acc)


def launch(table, tile_tensor, tile_start, *, n_inputs, acc_f64, block):
    """One launch over all tiles; tensors are on the kernel's device. Tile starts are multiples of 128."""
    grid = (tile_tensor.numel(),)
    combine_kernel[grid](table, tile_tensor, tile_start, N=n_inputs, ACC_F64=acc_f64, BLOCK=block,
                         num_warps=8, enable_fp_fusion=False)


@triton.jit
def l1_buckets_kernel(table_ptr, tile_tensor_ptr, tile_start_ptr, buckets_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    """Σ|τᵢ| and Σ keepᵢ·|τᵢ| (τᵢ = xᵢ − b, fp32) as int64 sums of mantissas per exponent, by atomics into
    buckets[row, i, {all, kept}, 256] — integer sums, so the same on every backend (reference.py)."""
    t, row, start, offs, mask = tile_of(table_ptr, tile_tensor_ptr, tile_start_ptr, N, BLOCK)
    b = _load_acc(tb.base_ptr(row), tb.base_dtype(row), offs, mask, False)
    drop = tb.drop_threshold(row)
    for i in tl.static_range(N):
        tau = _load_acc(tb.input_ptr(row, i), tb.input_dtype(row, i), offs, mask, False) - b
        bits = tau.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        e = (bits >> 23).to(tl.int64)
        mant = ((bits & 0x7FFFFF) | tl.where(e != 0, 0x800000, 0).to(tl.uint32)).to(tl.int64)
        keep = mask
        if drop != 0:
            d32 = drop.to(tl.uint32)
            keep = mask & (_uniforms(tb.key(row, i), tb.first(row) + start, d32, BLOCK) >= d32)
        cell = buckets_ptr + (t * N + i) * 512 + e
        tl.atomic_add(cell, mant, mask=mask)
        tl.atomic_add(cell + 256, mant, mask=keep)


def launch_l1_buckets(table, tile_tensor, tile_start, buckets, *, n_inputs, block):
    l1_buckets_kernel[(tile_tensor.numel(),)](table, tile_tensor, tile_start, buckets, N=n_inputs, BLOCK=block,
                                              num_warps=8)
