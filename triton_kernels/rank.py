"""Segmented rank in Triton. Formula: fusedmerge/reference.py:row_rank_reference (0-based ascending rank of
|v| in its row, equal magnitudes in column order, NaN last), over (magnitude bits << 32 | column) keys,
which are distinct, so neither way below needs stability:

- rows up to COUNT_MAX long: rank_j = #{k : key_k < key_j}, a [BLOCK, BLOCK] comparison per row (no
  scatter; cheap for short rows, and the only way that is fast on the interpreter, whose tl.sort reduces in
  Python);
- longer rows (up to dispatch.MAX_RANK_ROW): tl.sort of the keys along the row padded to a power of two (a
  bitonic network), each position scattered to its column.

Each program takes ROWS rows: many on the interpreter (each program costs a fixed overhead there), one on
a GPU.

uniforms_kernel writes each element's 32-bit Philox uniform U = (A << 16) | B (fusedmerge/philox.py), both
streams drawn: DELLA compares U with a threshold that varies per element."""

import triton
import triton.language as tl

from .combine import _halves

COUNT_MAX = 256  # rows up to this length are ranked by counting
TILE_INTERPRETER = 1 << 14  # key elements (comparisons for counting) per program under TRITON_INTERPRET


@triton.jit
def _keys(values_ptr, r, rows, n, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (cols < n) & (r < rows)
    v = tl.load(values_ptr + r * n + cols, mask=mask, other=0.0)
    magnitude = (v.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    return cols, mask, tl.where(cols < n, (magnitude << 32) | cols.to(tl.int64), 0x7FFFFFFFFFFFFFFF)


@triton.jit
def row_rank_kernel(values_ptr, out_ptr, rows, n, ROWS: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]
    cols, mask, key = _keys(values_ptr, r, rows, n, BLOCK)  # padding keys are the largest
    if COUNT:
        rank = tl.sum((key[:, None, :] < key[:, :, None]).to(tl.int32), axis=2)
        tl.store(out_ptr + r * n + cols, rank, mask=mask)
    else:
        column = tl.sort(key, dim=1) & 0xFFFFFFFF
        tl.store(out_ptr + r * n + column, (cols + 0 * r).to(tl.int32), mask=mask)


def launch(values, out) -> None:
    """Ranks of a [rows, n] fp32 tensor into `out` (int32, same shape)."""
    rows, n = values.shape
    if not (rows and n):
        return
    block = triton.next_power_of_2(n)
    count = n <= COUNT_MAX
    per = 1
    if values.device.type == "cpu":
        per = min(triton.next_power_of_2(rows), max(1, TILE_INTERPRETER // (block * block if count else block)))
    row_rank_kernel[(triton.cdiv(rows, per),)](values, out, rows, n, ROWS=per, BLOCK=block, COUNT=count)


@triton.jit
def uniforms_kernel(out_ptr, key, numel, first, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    u = (_halves(key, first + start, 0, BLOCK) << 16) | _halves(key, first + start, 1, BLOCK)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    tl.store(out_ptr + offs, u.to(tl.int32, bitcast=True), mask=offs < numel)


def launch_uniforms(key: int, out, first: int = 0) -> None:
    """out[j] = U_{first+j} (int32 bits) for a 64-bit key, j < out.numel(); first: a multiple of 128."""
    n = out.numel()
    block = TILE_INTERPRETER if out.device.type == "cpu" else 1024
    if n:
        uniforms_kernel[(triton.cdiv(n, block),)](out, key - (1 << 64) if key >= 1 << 63 else key, n, first, BLOCK=block)
