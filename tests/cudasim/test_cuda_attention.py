"""Split-K flash-decoding and the LSE merge (fast/cuda/attention.py) against the reference and a float64 oracle."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from cuda_helpers import assert_flash_tolerance, oracle, upto
from retrokv.fast.cuda import attention as cu
from retrokv.reference import attention as ref


@st.composite
def qkv(draw):
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 8))                              # Hq / Hkv = 1..8
    d = draw(st.sampled_from([1, 3, 8, 17] + upto([], [64, 128])))
    dv = draw(st.sampled_from([1, 5, d]))                    # dv != d included
    n = draw(st.integers(0, upto(40, 5000)))                           # N = 0, 1, and not a multiple of the tile
    t = draw(st.one_of(st.none(), st.integers(1, max(1, min(n, 4)))))
    causal = draw(st.booleans()) and t is not None and n >= t
    mag = draw(st.sampled_from([0.1, 1.0, 4.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    q = (rng.standard_normal((hkv * g, d) if t is None else (hkv * g, t, d)) * mag).astype(np.float32)
    k = (rng.standard_normal((hkv, n, d)) * mag).astype(np.float32)
    v = rng.standard_normal((hkv, n, dv)).astype(np.float32)
    return q, k, v, causal


@settings(max_examples=30, deadline=None)
@given(qkv())
def test_error_is_a_small_multiple_of_reference_error(arrays, case):
    q, k, v, causal = case
    out, lse = cu.partial_attention(*(arrays.dev(x) for x in (q, k, v)), causal=causal)
    got = arrays.host(out), arrays.host(lse)
    assert got[0].dtype == np.float32
    assert_flash_tolerance(got, ref.partial_attention(q, k, v, causal=causal), oracle(q, k, v, causal))


def test_n_zero_and_one(arrays, rng):
    q = rng.standard_normal((6, 8)).astype(np.float32)
    k = rng.standard_normal((3, 1, 8)).astype(np.float32)
    v = rng.standard_normal((3, 1, 5)).astype(np.float32)
    out, lse = (arrays.host(x) for x in cu.partial_attention(arrays.dev(q), arrays.dev(k), arrays.dev(v)))
    np.testing.assert_allclose(out, np.repeat(v[:, 0], 2, axis=0), atol=1e-7)     # one key: its value
    out, lse = (arrays.host(x) for x in cu.partial_attention(arrays.dev(q), arrays.dev(k[:, :0]), arrays.dev(v[:, :0])))
    assert out.shape == (6, 5) and not out.any() and np.isneginf(lse).all()


def test_causal_last_query_equals_decode_and_scale(arrays, rng):
    q = rng.standard_normal((4, 5, 16)).astype(np.float32)
    k = rng.standard_normal((2, 37, 16)).astype(np.float32)
    v = rng.standard_normal((2, 37, 16)).astype(np.float32)
    dq, dk, dv = (arrays.dev(x) for x in (q, k, v))
    block = arrays.host(cu.full_attention(dq, dk, dv, causal=True, scale=0.3))
    np.testing.assert_allclose(block[:, -1], arrays.host(cu.full_attention(dq[:, -1], dk, dv, scale=0.3)), atol=1e-6)
    np.testing.assert_allclose(block, ref.full_attention(q, k, v, causal=True, scale=0.3), atol=2e-6)


def test_half_precision_storage(arrays, rng):
    """K/V stored as float16 are read as they are; scores and sums are float32."""
    q = rng.standard_normal((4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 30, 8)).astype(np.float16)
    v = rng.standard_normal((2, 30, 8)).astype(np.float16)
    out = arrays.host(cu.full_attention(arrays.dev(q), arrays.dev(k), arrays.dev(v)))
    np.testing.assert_allclose(out, ref.full_attention(q, k.astype(np.float32), v.astype(np.float32)), atol=2e-6)


@settings(max_examples=15, deadline=None)
@given(qkv(), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_partition_merges_to_full_attention(arrays, case, n_parts, seed):
    q, k, v, _ = case
    q = q if q.ndim == 2 else q[:, 0]
    labels = np.random.default_rng(seed).integers(0, n_parts, k.shape[1])     # some parts may be empty
    parts = [cu.partial_attention(arrays.dev(q), arrays.dev(k[:, labels == p]), arrays.dev(v[:, labels == p]))
             for p in range(n_parts)]
    out, lse = (arrays.host(x) for x in cu.merge_partials(parts))
    want, want_lse = ref.partial_attention(q, k, v)
    np.testing.assert_allclose(out, want, atol=3e-6, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=3e-6, rtol=1e-6)


def test_merge_matches_reference_and_empty_is_identity(arrays, rng):
    parts = [(rng.standard_normal((3, 2, 4)).astype(np.float32),
              np.where(rng.random((3, 2)) < 0.3, -np.inf, rng.standard_normal((3, 2)) * 5).astype(np.float32))
             for _ in range(4)]
    got = [arrays.host(x) for x in cu.merge_partials([(arrays.dev(o), arrays.dev(l)) for o, l in parts])]
    want = ref.merge_partials(parts)
    np.testing.assert_allclose(got[0], want[0], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(got[1], want[1], atol=2e-6, rtol=1e-6)
    empty = (np.zeros((3, 2, 4), np.float32), np.full((3, 2), -np.inf, np.float32))
    out, lse = (arrays.host(x) for x in cu.merge_partials([(arrays.dev(a), arrays.dev(b)) for a, b in (empty, empty)]))
    assert not out.any() and np.isneginf(lse).all()
