"""LazyAttention kernels (fast/cuda/lazy.py): RoPE applied in the kernel from each document's offset equals the
reference (which rotates a block at a time) and Block-Attention (which materialises the rotated documents)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from cuda_helpers import upto
from retrokv.fast.cuda import lazy as cu
from retrokv.reference import lazy as ref


@st.composite
def workloads(draw):
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 8, 16]))
    dv = draw(st.sampled_from([3, d]))
    lengths = draw(st.lists(st.integers(0, upto(20, 700)), min_size=0, max_size=3))
    block = draw(st.sampled_from([1, 4, 16]))
    t = draw(st.integers(1, 3))
    m = t + draw(st.integers(0, 2))
    start = draw(st.integers(0, 30))
    conv = draw(st.sampled_from(["half", "interleaved"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    order = draw(st.permutations(range(len(lengths))))
    # the paged pool: documents in storage order, each in ceil(L / B) blocks (padding rows are garbage)
    phys, table, first = 0, [], []
    for n in lengths:
        first.append(phys)
        phys += -(-n // block)
    for doc in order:                                            # the request's logical order
        for b in range(-(-lengths[doc] // block)):
            table.append((first[doc] + b, min(block, lengths[doc] - b * block), doc))
    offsets = np.zeros(len(lengths), np.int64)
    pos = start
    for doc in order:
        offsets[doc] = pos
        pos += lengths[doc]
    pool_k = rng.standard_normal((hkv, phys * block, d)).astype(np.float32)
    pool_v = rng.standard_normal((hkv, phys * block, dv)).astype(np.float32)
    q = rng.standard_normal((hkv * g, t, d)).astype(np.float32)
    kt = rng.standard_normal((hkv, m, d)).astype(np.float32)
    vt = rng.standard_normal((hkv, m, dv)).astype(np.float32)
    return q, kt, vt, pool_k, pool_v, np.array(table, np.int64).reshape(-1, 3), offsets, block, conv


def close(arrays, got, want):
    for x, y in zip(got, want):
        x = arrays.host(x)
        assert x.shape == y.shape and np.array_equal(np.isneginf(x), np.isneginf(y))
        fin = np.isfinite(y)
        np.testing.assert_allclose(x[fin], y[fin], atol=1e-5, rtol=1e-5)   # the Numba ring's tolerance


@settings(max_examples=20, deadline=None)
@given(workloads())
def test_prefill_and_decode_match_reference(arrays, w):
    q, kt, vt, pool_k, pool_v, table, offsets, block, conv = w
    dev = [arrays.dev(x) for x in (q, kt, vt, pool_k, pool_v)]
    args = (table, offsets, block, 1e4, conv)
    close(arrays, cu.lazy_prefill_attention(*dev, *args), ref.lazy_prefill_attention(q, kt, vt, pool_k, pool_v, *args))
    close(arrays, cu.lazy_decode_attention(dev[0][:, -1], *dev[1:], *args),
          ref.lazy_decode_attention(q[:, -1], kt, vt, pool_k, pool_v, *args))
    close(arrays, cu.block_attention(*dev, *args), ref.block_attention(q, kt, vt, pool_k, pool_v, *args))
    got = cu.materialize(dev[3], dev[4], *args[:-1], conv)
    want = ref.materialize(pool_k, pool_v, *args[:-1], conv)
    for x, y in zip(got, want):
        assert np.array_equal(arrays.host(x), y) if arrays.exact else np.allclose(arrays.host(x), y, atol=1e-5)


def test_lazy_equals_block_attention(arrays, rng):
    """LazyAttention is mathematically Block-Attention: rotating in the kernel equals materialising."""
    pool_k = rng.standard_normal((1, 48, 8)).astype(np.float32)
    pool_v = rng.standard_normal((1, 48, 8)).astype(np.float32)
    table = np.array([[2, 16, 1], [0, 16, 0], [1, 9, 0]], np.int64)       # doc 1 first, then doc 0
    offsets = np.array([16 + 3, 3])
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    kt = rng.standard_normal((1, 2, 8)).astype(np.float32)
    dev = [arrays.dev(x) for x in (q, kt, kt, pool_k, pool_v)]
    lazy = cu.lazy_prefill_attention(*dev, table, offsets, 16)
    blk = cu.block_attention(*dev, table, offsets, 16)
    np.testing.assert_allclose(arrays.host(lazy[0]), arrays.host(blk[0]), atol=1e-5)
