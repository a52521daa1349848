"""Segmented spherical k-means (RetroInfer §4.2): the invariants of its output, and fast == reference bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from retrokv.fast import clustering as fast
from retrokv.reference import clustering as ref
from retrokv.testing.invariants import check_jensen_lower_bound


@st.composite
def keys_values(draw):
    n = draw(st.integers(0, 300))
    d = draw(st.sampled_from([1, 3, 8, 17]))
    dv = draw(st.sampled_from([1, 5, 8]))
    tpc = draw(st.sampled_from([1, 4, 16]))
    seg = draw(st.sampled_from([16, 50, 8192]))
    iters = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    offset = draw(st.sampled_from([0.0, 5.0]))          # a shared component, as RoPE'd keys have
    k = (rng.standard_normal((n, d)) + offset).astype(np.float32)
    if n > 3 and draw(st.booleans()):
        k[1::3] = k[0]                                   # duplicated keys: ties and empty clusters
    v = rng.standard_normal((n, dv)).astype(np.float32)
    c, s = ref.plan_clusters(n, tpc, seg)
    return k, v, c, s, iters


def test_plan_matches_paper():
    assert ref.plan_clusters(131072) == (8192, 16)         # 128K -> 16 segments x 512 clusters
    assert ref.plan_clusters(8192) == (512, 1)
    assert ref.plan_clusters(0) == (0, 0)
    assert ref.plan_clusters(1) == (1, 1)
    assert ref.plan_clusters(3, tokens_per_cluster=1) == (3, 1)


@given(keys_values())
def test_reference_invariants(case):
    k, v, c, s, iters = case
    out = ref.segmented_kmeans(k, v, c, s, iters)
    n = len(k)
    assert out.centroids.shape == (c, k.shape[1]) and out.value_sums.shape == (c, v.shape[1])
    assert out.sizes.sum() == n and (out.sizes >= 0).all()
    # inverted lists: order is a permutation, grouped by cluster, token order inside a cluster
    assert np.array_equal(np.sort(out.order), np.arange(n))
    assert np.array_equal(out.offsets, np.concatenate([[0], np.cumsum(out.sizes)]))
    for i in range(c):
        members = out.order[out.offsets[i]:out.offsets[i + 1]]
        assert (out.assign[members] == i).all() and (np.diff(members) > 0).all()
        if len(members):  # final centroid = plain mean of the raw keys (the Jensen bound needs it)
            np.testing.assert_allclose(out.centroids[i], k[members].astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(out.value_sums[i], v[members].astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
        else:
            assert not out.centroids[i].any() and not out.value_sums[i].any()


@given(keys_values())
def test_fast_equals_reference_bit_for_bit(case):
    k, v, c, s, iters = case
    a = ref.segmented_kmeans(k, v, c, s, iters)
    b = fast.segmented_kmeans(k, v, c, s, iters)
    for name, x, y in zip(a._fields, a, b):
        assert x.dtype == y.dtype and np.array_equal(x, y), name


@given(keys_values(), st.integers(0, 2**31 - 1))
def test_jensen_lower_bound(case, seed):
    """RetroInfer Eq. 3: size * exp(q.C) <= sum over the cluster of exp(q.k), for any query."""
    k, v, c, s, iters = case
    out = ref.segmented_kmeans(k, v, c, s, iters)
    q = np.random.default_rng(seed).standard_normal(k.shape[1]) * 0.5
    members = [out.order[out.offsets[i]:out.offsets[i + 1]] for i in range(c)]
    check_jensen_lower_bound(q, k, members, out.centroids, out.sizes, scale=1.0, slack=np.log1p(1e-5))


def test_separated_blobs_are_recovered():
    """Keys drawn around a few well-separated directions land in clusters that never mix two directions."""
    rng = np.random.default_rng(1)
    dirs = np.linalg.qr(rng.standard_normal((32, 8)))[0].T * 10       # (8, 32) orthogonal, far apart
    label = rng.integers(0, 8, 2000)
    k = (dirs[label] + 0.3 * rng.standard_normal((2000, 32))).astype(np.float32)
    out = ref.segmented_kmeans(k, k, 64, 2, 10)
    for i in np.flatnonzero(out.sizes):
        assert len(set(label[out.order[out.offsets[i]:out.offsets[i + 1]]])) == 1


def test_fast_rejects_cupy_like_input():
    class Fake:  # anything that is not a NumPy array
        pass
    with pytest.raises(TypeError):
        fast.segmented_kmeans(Fake(), Fake(), 1, 1)
