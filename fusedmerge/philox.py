"""Philox4x32-10 (Random123), the stream of Triton's ``tl.randint4x``, in plain torch; and the
name-keyed drop masks every backend draws from it.

Stream: for counter (c0, c1, c2, c3) and key (k0, k1), ten rounds of::

    c0' = hi(B·c2) ^ c1 ^ k0    c1' = lo(B·c2)    c2' = hi(A·c0) ^ c3 ^ k1    c3' = lo(A·c0)
    k0 += 0x9E3779B9            k1 += 0xBB67AE85            (A = 0xD2511F53, B = 0xCD9E8D57)

Masks: the key of (seed, model index, tensor name) is the first 8 bytes (little endian) of
BLAKE2b("fusedmerge-dare-v2:{seed}:{index}:{name}") (v1 keyed a retired layout of
4 elements per call). Element j of the flattened tensor has the 32-bit
uniform U = (A << 16) | B, where A and B are 16-bit halves from the streams s = 0 and s = 1: in group
g = j // 128, with r = j % 128, half (r // 16) % 2 of word r // 32 of the call with counter
(n mod 2³², n // 2³², s, 0), n = 16·g + r % 16. It is dropped when U < T, T = floor(p·2³²): an integer
comparison, the same on every backend, device and order of processing. A row block of a tensor (fusedmerge
merge's streaming of large tensors) starting at element `first`, a multiple of 128, draws the counters of
its elements' indices in the whole tensor: its calls start at n = first / 8. Kernels need B only where
A = T >> 16 (probability 2⁻¹⁶), so one call serves 8 elements; the 16 calls of a group, as 16 SIMD
lanes, give 16 consecutive elements per (word, half) without shuffles.
"""

from __future__ import annotations

import hashlib
import math

import torch

A, B = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
ELEMENTS_PER_CALL = 8
GROUP = 128  # elements served by 16 consecutive calls
_M32 = 0xFFFFFFFF


def mask_key(seed: int, index: int, name: str) -> int:
    """The 64-bit Philox key of model `index`'s tensor `name` under `seed`."""
    digest = hashlib.blake2b(f"fusedmerge-dare-v2:{int(seed)}:{int(index)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_threshold(p: float) -> int:
    """T = floor(p·2³²): an element is dropped when its 32-bit uniform U is below T."""
    return math.floor(float(p) * 2**32)


def _mulhilo(m: int, x: torch.Tensor):
    """(hi, lo) 32-bit halves of m·x for uint32 values held in int64, without int64 overflow."""
    xh, xl = x >> 16, x & 0xFFFF
    ph, pl = xh * m, xl * m  # < 2**48 each
    mid = (ph & 0xFFFF) << 16
    lo_full = mid + pl
    lo = lo_full & _M32
    hi = ((ph >> 16) + (lo_full >> 32)) & _M32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 counters; returns the four words (int64, in [0, 2³²))."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(B, c2)
        hi_a, lo_a = _mulhilo(A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + W0) & _M32, (k1 + W1) & _M32
    return c0, c1, c2, c3


def element_halves(key: int, numel: int, stream: int, device=None, first: int = 0) -> torch.Tensor:
    """The 16-bit half of stream `stream` for each of elements first .. first + numel − 1 (int64 tensor)."""
    if first % GROUP:
        raise ValueError(f"a block's first element must be a multiple of {GROUP}, got {first}")
    groups = -(-numel // GROUP)
    n = torch.arange(first // 8, first // 8 + groups * 16, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(n & _M32, n >> 32, torch.full_like(n, stream), torch.zeros_like(n),
                                   key & _M32, key >> 32))  # [word, group·16 + lane]
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=1)  # [word, half, group·16 + lane]
    by_group = halves.reshape(4, 2, groups, 16).permute(2, 0, 1, 3)  # [group, word, half, lane]
    return by_group.reshape(-1)[:numel]


def random_words(key: int, numel: int, device=None, first: int = 0) -> torch.Tensor:
    """The 32-bit uniform U of each of `numel` elements from `first` (int64 tensor) for a 64-bit key."""
    return (element_halves(key, numel, 0, device, first) << 16) | element_halves(key, numel, 1, device, first)


def keep_mask(key: int, numel: int, threshold: int, device=None, first: int = 0) -> torch.Tensor:
    """Bool mask of kept elements: U >= threshold (elements first .. first + numel − 1)."""
    return random_words(key, numel, device, first) >= threshold
