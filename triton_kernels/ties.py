"""TIES merge in Triton over the int64 table of fusedmerge/dispatch/_table.py (coefficients = weights wᵢ),
with the trim thresholds found beforehand (thresholds, below). Per element, in fp32, the formula of
fusedmerge/reference.py:ties_reference::

    τ̂ᵢ = |τᵢ| ≥ tᵢ ? τᵢ : 0        (DARE-TIES, rows with a drop threshold: keepᵢ ? τᵢ·r : 0)
    vᵢ = wᵢ·τ̂ᵢ (weighted vote) or τ̂ᵢ;   s = Σ vᵢ or Σ sign(vᵢ);   σ = sign(s), tie_sign where 0
    m  = Σ agreeᵢ·wᵢτ̂ᵢ  |  that / Σ agreeᵢ·wᵢ  |  σ·max agreeᵢ·|wᵢτ̂ᵢ|;     out = round(b + λ·m)

Two sweeps over the models per tile (vote, then merge) reload the inputs instead of holding N·BLOCK
values. The vote kernel alone returns each tile's Σ σ, for vote_tie = majority.
"""

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import table as tb
from .combine import _load_acc, _store_rounded, _uniforms, tile_of
from .table import MERGE_MAX, MERGE_MEAN

BLOCK = 1024
BLOCK_INTERPRETER = 1 << 14


def thresholds(jobs: Sequence, spec) -> torch.Tensor:
    """Trim thresholds of TIES jobs (fusedmerge/reference.py CombineJob, TiesSpec), int64 [scopes, N] on the
    CPU: per scope and model, the bits of the k-th largest |τ| (τ = x - base in fp32). torch.kthvalue (a radix
    select on CUDA) runs over one model's magnitudes at a time, so the scratch is one scope of int32, never N
    of them."""
    scopes = [[j] for j in jobs] if spec.scope == "tensor" else [list(jobs)]
    out = torch.zeros((len(scopes), len(spec.weights)), dtype=torch.int64)
    for s, scope in enumerate(scopes):
        for m in range(len(spec.weights)):
            bits = torch.cat([(j.inputs[m].float() - j.base.float()).abs().view(torch.int32).reshape(-1)
                              for j in scope])
            out[s, m] = int(torch.kthvalue(bits, bits.numel() - spec.ks[s][m] + 1).values)
    return out


@triton.jit
def _trimmed(row, m, b, start, offs, mask, thr_row, rescale, BLOCK: tl.constexpr):
    tau = _load_acc(tb.input_ptr(row, m), tb.input_dtype(row, m), offs, mask, False) - b
    drop = tb.drop_threshold(row)
    if drop != 0:
        d32 = drop.to(tl.uint32)
        keep = _uniforms(tb.key(row, m), tb.first(row) + start, d32, BLOCK) >= d32
        if rescale != 1.0:
            tau = tau * rescale
        t = tl.where(keep, tau, 0.0)
    else:
        magnitude = tau.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        t = tl.where(magnitude >= tl.load(thr_row + m).to(tl.uint32), tau, 0.0)
    return t


@triton.jit
def _sign(x):
    return (x > 0).to(tl.float32) - (x < 0).to(tl.float32)


@triton.jit
def _vote(row, b, start, offs, mask, thr_row, rescale, N: tl.constexpr, WEIGHTED: tl.constexpr,
          COUNT: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.zeros((BLOCK,), tl.float32)
    for m in tl.static_range(N):
        t = _trimmed(row, m, b, start, offs, mask, thr_row, rescale, BLOCK)
        if WEIGHTED:
            t = t * tb.coeff(row, m).to(tl.float32)
        if COUNT:
            t = _sign(t)
        if m == 0:
            s = t
        else:
            s = s + t
    return _sign(s)


@triton.jit
def _tile(table_ptr, tile_tensor_ptr, tile_start_ptr, thr_ptr, MODEL_SCOPE: tl.constexpr, N: tl.constexpr,
          BLOCK: tl.constexpr):
    t, row, start, offs, mask = tile_of(table_ptr, tile_tensor_ptr, tile_start_ptr, N, BLOCK)
    if MODEL_SCOPE:
        thr_row = thr_ptr
    else:
        thr_row = thr_ptr + t * N
    b = _load_acc(tb.base_ptr(row), tb.base_dtype(row), offs, mask, False)
    return row, start, offs, mask, thr_row, b


@triton.jit
def ties_vote_kernel(table_ptr, tile_tensor_ptr, tile_start_ptr, thr_ptr, sums_ptr, rescale,
                     MODEL_SCOPE: tl.constexpr, N: tl.constexpr, WEIGHTED: tl.constexpr, COUNT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row, start, offs, mask, thr_row, b = _tile(table_ptr, tile_tensor_ptr, tile_start_ptr, thr_ptr, MODEL_SCOPE,
                                               N, BLOCK)
    sigma = _vote(row, b, start, offs, mask, thr_row, rescale, N, WEIGHTED, COUNT, BLOCK)
    tl.store(sums_ptr + tl.program_id(0), tl.sum(tl.where(mask, sigma, 0.0).to(tl.int64), axis=0))


@triton.jit
def ties_merge_kernel(table_ptr, tile_tensor_ptr, tile_start_ptr, thr_ptr, rescale, scaling, tie_sign,
                      MODEL_SCOPE: tl.constexpr, N: tl.constexpr, WEIGHTED: tl.constexpr, COUNT: tl.constexpr,
                      MERGE: tl.constexpr, BLOCK: tl.constexpr):
    row, start, offs, mask, thr_row, b = _tile(table_ptr, tile_tensor_ptr, tile_start_ptr, thr_ptr, MODEL_SCOPE,
                                               N, BLOCK)
    sigma = _vote(row, b, start, offs, mask, thr_row, rescale, N, WEIGHTED, COUNT, BLOCK)
    sigma = tl.where(sigma == 0, tie_sign, sigma)
    merged = tl.zeros((BLOCK,), tl.float32)
    den = tl.zeros((BLOCK,), tl.float32)
    for m in tl.static_range(N):
        t = _trimmed(row, m, b, start, offs, mask, thr_row, rescale, BLOCK)
        w = tb.coeff(row, m).to(tl.float32)
        u = t * w
        if WEIGHTED:
            v = u
        else:
            v = t
        agree = ((v > 0) & (sigma > 0)) | ((v < 0) & (sigma < 0))
        if MERGE == MERGE_MAX:
            mag = tl.where(agree, tl.abs(u), 0.0)
            nan = (merged != merged) | (mag != mag)
            bigger = tl.where(merged > mag, merged, mag)
            if m == 0:
                merged = mag
            else:
                merged = tl.where(nan, merged + mag, bigger)
        else:
            term = tl.where(agree, u, 0.0)
            dw = tl.where(agree, w, 0.0)
            if m == 0:
                merged = term
                den = dw
            else:
                merged = merged + term
                den = den + dw
    if MERGE == MERGE_MAX:
        merged = sigma * merged
    if MERGE == MERGE_MEAN:
        merged = tl.where(den != 0, tl.math.div_rn(merged, tl.where(den != 0, den, 1.0)), 0.0)
    _store_rounded(tb.out_ptr(row), tb.out_dtype(row), offs, mask, b + merged * scaling)


def launch_vote(table, tile_tensor, tile_start, thresholds, sums, *, n_inputs, model_scope, weighted, count,
                rescale, block):
    ties_vote_kernel[(tile_tensor.numel(),)](table, tile_tensor, tile_start, thresholds, sums, rescale,
                                             MODEL_SCOPE=model_scope, N=n_inputs, WEIGHTED=weighted, COUNT=count,
                                             BLOCK=block, num_warps=4, enable_fp_fusion=False)


def launch_merge(table, tile_tensor, tile_start, thresholds, *, n_inputs, model_scope, weighted, count, merge,
                 rescale, scaling, tie_sign, block):
    ties_merge_kernel[(tile_tensor.numel(),)](table, tile_tensor, tile_start, thresholds, rescale, scaling,
                                              tie_sign, MODEL_SCOPE=model_scope, N=n_inputs, WEIGHTED=weighted,
                                              COUNT=count, MERGE=merge, BLOCK=block, num_warps=4,
                                              enable_fp_fusion=False)
