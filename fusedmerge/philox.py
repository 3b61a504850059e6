"""Philox4x32-10 (Random123), the stream of Triton's ``tl.randint4x``, in plain torch; and the
name-keyed drop masks every backend draws from it.

Stream: for counter (c0, c1, c2, c3) and key (k0, k1), ten rounds of::

    c0' = hi(B·c2) ^ c1 ^ k0    c1' = lo(B·c2)    c2' = hi(A·c0) ^ c3 ^ k1    c3' = lo(A·c0)
    k0 += 0x9E3779B9            k1 += 0xBB67AE85            (A = 0xD2511F53, B = 0xCD9E8D57)

Masks: the key of (seed, model index, tensor name) is the first 8 bytes (little endian) of
BLAKE2b("fusedmerge-dare-v1:{seed}:{index}:{name}"); element j of the flattened tensor takes word j % 4 of
the call with counter (j // 4 mod 2³², j // 2³⁴, 0, 0). It is dropped when that word < T, with
T = floor(p·2³²): an integer comparison, the same on every backend, device and order of processing.
"""

from __future__ import annotations

import hashlib
import math

import torch

A, B = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
ELEMENTS_PER_CALL = 4
_M32 = 0xFFFFFFFF


def mask_key(seed: int, index: int, name: str) -> int:
    """The 64-bit Philox key of model `index`'s tensor `name` under `seed`."""
    digest = hashlib.blake2b(f"fusedmerge-dare-v1:{int(seed)}:{int(index)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def drop_threshold(p: float) -> int:
    """T = floor(p·2³²): an element is dropped when its 32-bit word is below T."""
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


def random_words(key: int, numel: int, device=None) -> torch.Tensor:
    """The 32-bit word of each of `numel` elements (int64 tensor) for a 64-bit key."""
    calls = -(-numel // ELEMENTS_PER_CALL)
    j = torch.arange(calls, dtype=torch.int64, device=device)
    zero = torch.zeros_like(j)
    words = philox4x32(j & _M32, j >> 32, zero, zero, key & _M32, key >> 32)
    return torch.stack(words, dim=1).reshape(-1)[:numel]


def keep_mask(key: int, numel: int, threshold: int, device=None) -> torch.Tensor:
    """Bool mask of kept elements: word >= threshold."""
    return random_words(key, numel, device) >= threshold
