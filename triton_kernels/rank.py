"""Segmented rank in Triton: one program per row sorts the row's (magnitude bits << 32 | column) keys with
tl.sort (a bitonic network over the row padded to a power of two) and scatters each position to its
column. Formula: fusedmerge/reference.py:row_rank_reference (0-based ascending rank of |v| in its row, equal
magnitudes in column order, NaN last). Rows up to dispatch.MAX_RANK_ROW; the key carries the column, so
the sort needs no stability."""

import triton
import triton.language as tl


@triton.jit
def row_rank_kernel(values_ptr, out_ptr, n, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    v = tl.load(values_ptr + r * n + cols, mask=mask, other=0.0)
    magnitude = (v.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    key = tl.where(mask, (magnitude << 32) | cols.to(tl.int64), 0x7FFFFFFFFFFFFFFF)  # padding sorts last
    column = tl.sort(key) & 0xFFFFFFFF
    tl.store(out_ptr + r * n + column, cols.to(tl.int32), mask=mask)


def launch(values, out) -> None:
    """Ranks of a [rows, n] fp32 tensor into `out` (int32, same shape)."""
    rows, n = values.shape
    if rows and n:
        row_rank_kernel[(rows,)](values, out, n, BLOCK=triton.next_power_of_2(n))
