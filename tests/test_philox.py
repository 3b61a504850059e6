"""Philox4x32-10: Random123 / Triton known answers, Triton's own stream, and the frozen mask scheme."""

import pytest
import torch

from fusedmerge.philox import ELEMENTS_PER_CALL, drop_threshold, element_halves, mask_key, philox4x32, random_words


def _words(counter, key):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    return [int(w) for w in philox4x32(*c, key & 0xFFFFFFFF, key >> 32)]


def test_random123_known_answers():
    assert _words((0, 0, 0, 0), 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _words((0, 0, 0, 0), 42) == [0x9CEAF053, 0x77F5493B, 0x12BF50AD, 0x5742B3D7]
    assert [w[0] for w in (_words((i, 0, 0, 0), 42) for i in range(4))] == [0x9CEAF053, 0xFCDB2127, 0xD36C0225,
                                                                           0xBAC70475]
    # Random123's kat_vectors: philox4x32_10 with all-ones counter and key
    assert _words((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


GOLDEN_U = ['0x22498bcf', '0xb095695f', '0xa648f003', '0xf1c098ec', '0x70b9ea21', '0xab600ced', '0x39d68d3d']


def _half(key, call, stream, word, half):
    return (_words((call, 0, stream, 0), key)[word] >> (16 * half)) & 0xFFFF


def test_stream_layout_is_frozen():
    """U = (A << 16) | B; element 128·g + 32·w + 16·h + l takes half h of word w of call 16·g + l,
    A from counter (call, 0, 0, 0) and B from (call, 0, 1, 0)."""
    assert ELEMENTS_PER_CALL == 8
    key = mask_key(0, 0, "w")
    assert key == mask_key(0, 0, "w") != mask_key(0, 1, "w") != mask_key(1, 0, "w")
    u = random_words(key, 300)
    for j in (0, 1, 15, 16, 31, 32, 77, 127, 128, 200, 299):
        g, r = divmod(j, 128)
        call, word, half = 16 * g + r % 16, r // 32, (r // 16) % 2
        assert int(u[j]) == _half(key, call, 0, word, half) << 16 | _half(key, call, 1, word, half), j
    assert torch.equal(element_halves(key, 300, 0), u >> 16)
    # golden values: changing them changes every mask drawn so far
    assert [hex(int(x)) for x in u[[0, 1, 16, 32, 127, 128, 299]]] == GOLDEN_U
    j = torch.tensor([2**32 + 2], dtype=torch.int64)
    z = torch.zeros_like(j)
    hi = [int(x) for x in philox4x32(j & 0xFFFFFFFF, j >> 32, z, z, key & 0xFFFFFFFF, key >> 32)]
    assert hi == _words((2, 1, 0, 0), key)
    assert drop_threshold(0.0) == 0 and drop_threshold(0.5) == 2**31 and drop_threshold(0.9) == 3865470566


def test_triton_randint4x_is_the_same_stream():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel(out_ptr, key, calls_ptr, stream, n: tl.constexpr):
        calls = tl.load(calls_ptr + tl.arange(0, n))
        if stream == 0:
            w0, w1, w2, w3 = tl.randint4x(key, calls)
        else:  # the counter's third word set: what the low halves B are drawn with
            lo = calls.to(tl.uint32)
            w0, w1, w2, w3 = tl.philox(key, lo, (calls >> 32).to(tl.uint32), lo * 0 + stream, lo * 0)
        base = out_ptr + tl.arange(0, n) * 4
        tl.store(base, w0.to(tl.int64))
        tl.store(base + 1, w1.to(tl.int64))
        tl.store(base + 2, w2.to(tl.int64))
        tl.store(base + 3, w3.to(tl.int64))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = torch.tensor([0, 1, 2, 3, 12345, 2**31 - 1, 2**32 + 5, 2**40 + 7], dtype=torch.int64, device=device)
    for key in (42, mask_key(7, 3, "vision_model.encoder.layers.0.mlp.fc1.weight")):
        for stream in (0, 1):
            out = torch.zeros(len(calls) * 4, dtype=torch.int64, device=device)
            signed = key - 2**64 if key >= 2**63 else key
            kernel[(1,)](out, signed, calls, stream, len(calls))
            want = []
            for c in calls.tolist():
                want += _words((c & 0xFFFFFFFF, c >> 32, stream, 0), key)
            assert [v & 0xFFFFFFFF for v in out.tolist()] == want
