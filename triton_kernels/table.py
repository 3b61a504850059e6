"""Named access to a row of the int64 table (fusedmerge/dispatch/_table.py, csrc/common/table.h) from
Triton kernels, and the dtype and merge codes as ``tl.constexpr``: the offsets and codes come from
fusedmerge/dispatch/_table.py, never spelled out here. ``row`` is the address of the row's first entry
(row_of)."""

import triton
import triton.language as tl

from ..dispatch import _table as _layout

# Module globals a @triton.jit function reads must be tl.constexpr.
_OUT_PTR = tl.constexpr(_layout.OUT_PTR)
_OUT_DTYPE = tl.constexpr(_layout.OUT_DTYPE)
_NUMEL = tl.constexpr(_layout.NUMEL)
_BASE_PTR = tl.constexpr(_layout.BASE_PTR)
_BASE_DTYPE = tl.constexpr(_layout.BASE_DTYPE)
_DROP_THRESHOLD = tl.constexpr(_layout.DROP_THRESHOLD)
_FIRST = tl.constexpr(_layout.FIRST)
_HEADER_WIDTH = tl.constexpr(_layout.HEADER_WIDTH)
_IN_PTR = tl.constexpr(_layout.IN_PTR)
_IN_DTYPE = tl.constexpr(_layout.IN_DTYPE)
_COEFF = tl.constexpr(_layout.COEFF)
_KEY = tl.constexpr(_layout.KEY)
_INPUT_STRIDE = tl.constexpr(_layout.INPUT_STRIDE)

F32 = tl.constexpr(_layout.F32)
F16 = tl.constexpr(_layout.F16)
BF16 = tl.constexpr(_layout.BF16)
F64 = tl.constexpr(_layout.F64)

MERGE_SUM = tl.constexpr(_layout.MERGE_SUM)
MERGE_MEAN = tl.constexpr(_layout.MERGE_MEAN)
MERGE_MAX = tl.constexpr(_layout.MERGE_MAX)


@triton.jit
def row_of(table_ptr, t, N: tl.constexpr):
    """Address of row t of a table with N inputs per row."""
    return table_ptr + t * (_HEADER_WIDTH + _INPUT_STRIDE * N)


@triton.jit
def out_ptr(row):
    return tl.load(row + _OUT_PTR)


@triton.jit
def out_dtype(row):
    return tl.load(row + _OUT_DTYPE)


@triton.jit
def numel(row):
    return tl.load(row + _NUMEL)


@triton.jit
def base_ptr(row):
    """0 when the row has no base."""
    return tl.load(row + _BASE_PTR)


@triton.jit
def base_dtype(row):
    return tl.load(row + _BASE_DTYPE)


@triton.jit
def drop_threshold(row):
    """0 when the row keeps every element."""
    return tl.load(row + _DROP_THRESHOLD)


@triton.jit
def first(row):
    """Index of the row's first element in its whole tensor (a multiple of 128): Philox counters start there."""
    return tl.load(row + _FIRST)


@triton.jit
def _input_entry(row, i, offset: tl.constexpr):
    return tl.load(row + _HEADER_WIDTH + _INPUT_STRIDE * i + offset)


@triton.jit
def input_ptr(row, i):
    return _input_entry(row, i, _IN_PTR)


@triton.jit
def input_dtype(row, i):
    return _input_entry(row, i, _IN_DTYPE)


@triton.jit
def coeff(row, i):
    """Coefficient of input i, fp64."""
    return _input_entry(row, i, _COEFF).to(tl.float64, bitcast=True)


@triton.jit
def key(row, i):
    """Philox key of input i (int64 bits)."""
    return _input_entry(row, i, _KEY)
