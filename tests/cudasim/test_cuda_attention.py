"""Split-K flash-decoding and the LSE merge (fast/cuda/attention.py) against the reference and a float64 oracle."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cuda_helpers import GPU, assert_flash_tolerance, oracle, upto
from retrokv.fast.cuda._xp import geometry
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


def _per_group(fn, q, k, v, g, lengths):
    """``fn`` (partial attention, reference or oracle) applied per KV head over its first ``lengths[h]`` keys."""
    parts = [fn(q[h * g:(h + 1) * g], k[h:h + 1, :lengths[h]], v[h:h + 1, :lengths[h]]) for h in range(k.shape[0])]
    return np.concatenate([o for o, _ in parts]), np.concatenate([l for _, l in parts])


class _Spy:
    """A kernel that counts its launches (``kernel[blocks, threads](*args)``) and runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, config):
        self.calls += 1
        return self.kernel[config]


@st.composite
def grouped(draw):
    """Decode shapes for the group kernel: G = 1..8, Hkv = 1..3, dv != d, N = 0, 1 and odd, float16 or
    float32 K/V, and (the execution buffer) a different key limit per KV head."""
    hkv, g = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    d = draw(st.sampled_from([1, 3, 8, 17]))
    fits = cu.ACC * geometry().threads // g                  # the accumulators of a group fit in registers
    dv = draw(st.sampled_from([x for x in (1, 5, d, d + 2) if x <= fits]))
    n = draw(st.one_of(st.sampled_from([0, 1]), st.integers(2, 3000 if GPU else 45)))
    lengths = draw(st.one_of(st.just([n] * hkv), st.lists(st.integers(0, n), min_size=hkv, max_size=hkv)))
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    mag = draw(st.sampled_from([0.1, 1.0, 4.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    q = (rng.standard_normal((hkv * g, d)) * mag).astype(np.float32)
    k = (rng.standard_normal((hkv, n, d)) * mag).astype(dtype)
    v = rng.standard_normal((hkv, n, dv)).astype(dtype)
    return q, k, v, g, np.asarray(lengths, np.int64)


@settings(max_examples=25, deadline=None)
@given(grouped())
def test_group_kernel_equals_per_row_kernel(arrays, case):
    """The GQA group kernel (one block per KV head and chunk) gives the per-row kernel's partials on the same
    chunks, and through ``attention_partials`` (its own chunking) the same output, within the flash tolerance."""
    q, k, v, g, lengths = case
    hkv, n, d = k.shape
    scale = float(d ** -0.5)
    dq, dk, dv_ = (arrays.dev(x) for x in (q, k, v))
    limits = arrays.dev(np.repeat(lengths, g))
    tile = cu.group_tile(g, d, v.shape[2])
    assert tile > 0
    row = cu.attention_partials(dq, dk, dv_, 1, g, limits, scale)                     # _chunk_kernel
    n_chunks, chunk = cu.split(n, hkv * g)     # the per-row kernel's chunks
    same = [arrays.m.full_like(row[0], -np.inf), arrays.m.zeros_like(row[1]), arrays.m.zeros_like(row[2])]
    if n:
        cu.launch(cu._group_kernel, n_chunks * hkv, dq, dk, dv_, np.int64(g), limits, np.float32(scale),
                  np.int64(chunk), np.int64(tile), *same)
    want, got = [arrays.host(x) for x in row], [arrays.host(x) for x in same]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)                    # m (-inf where empty)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)                    # l
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want[2]).max(initial=0)))
    out = [arrays.host(x) for x in cu.merge_chunks(*cu.attention_partials(dq, dk, dv_, 1, g, limits, scale,
                                                                          group_limits=True))]
    out_row = [arrays.host(x) for x in cu.merge_chunks(*row)]
    np.testing.assert_allclose(out[0], out_row[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], out_row[1], rtol=1e-6, atol=1e-6)
    ref_fn = lambda *a: ref.partial_attention(*a, scale=scale)                          # noqa: E731
    exact = _per_group(lambda *a: oracle(*a, scale=scale), q, k, v, g, lengths)
    assert_flash_tolerance(out, _per_group(ref_fn, q, k, v, g, lengths), exact)
    assert_flash_tolerance(out_row, _per_group(ref_fn, q, k, v, g, lengths), exact)


@pytest.mark.parametrize("too_big", ["accumulators", "rows"])
def test_group_too_large_falls_back_to_the_per_row_kernel(arrays, rng, monkeypatch, too_big):
    """A group whose G x dv accumulators do not fit ACC registers per thread (or with more than MAX_G rows)
    runs the per-row kernel, and decode is still right; a group that fits runs the group kernel."""
    hkv, d, n = 2, 8, 37
    g = 4 if too_big == "accumulators" else cu.MAX_G + 1
    dv = cu.ACC * geometry().threads // g + 1 if too_big == "accumulators" else 1
    assert cu.group_tile(g, d, dv) == 0 and cu.group_tile(2, d, 3) > 0
    for g_, dv_, fits in ((g, dv, False), (2, 3, True)):
        spies = {name: _Spy(getattr(cu, name)) for name in ("_group_kernel", "_chunk_kernel")}
        for name, spy in spies.items():
            monkeypatch.setattr(cu, name, spy)
        q = rng.standard_normal((hkv * g_, d)).astype(np.float32)
        k = rng.standard_normal((hkv, n, d)).astype(np.float16)
        v = rng.standard_normal((hkv, n, dv_)).astype(np.float16)
        out, lse = (arrays.host(x) for x in cu.partial_attention(*(arrays.dev(x) for x in (q, k, v))))
        assert (spies["_group_kernel"].calls, spies["_chunk_kernel"].calls) == ((1, 0) if fits else (0, 1))
        assert_flash_tolerance((out, lse), ref.partial_attention(q, k, v), oracle(q, k, v))
        monkeypatch.undo()
