"""GPU segmented k-means (fast/cuda/clustering.py): RetroInfer §4.2's invariants, and the reference's clusters
exactly under the simulator (same GEMM blocks, same float64 sums in token order)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from cuda_helpers import upto
from retrokv.fast.cuda import clustering as cu
from retrokv.reference import clustering as ref


@st.composite
def keys_values(draw):
    n = draw(st.integers(0, upto(90, 4000)))
    d = draw(st.sampled_from([1, 3, 8]))
    dv = draw(st.sampled_from([1, 5]))
    tpc = draw(st.sampled_from([1, 4, 16]))
    seg = draw(st.sampled_from([16, 40, 8192]))
    iters = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    k = (rng.standard_normal((n, d)) + draw(st.sampled_from([0.0, 5.0]))).astype(np.float32)
    if n > 3 and draw(st.booleans()):
        k[1::3] = k[0]                                   # duplicated keys: ties and empty clusters
    v = rng.standard_normal((n, dv)).astype(np.float32)
    c, s = ref.plan_clusters(n, tpc, seg)
    return k, v, c, s, iters


@settings(max_examples=20, deadline=None)
@given(keys_values())
def test_structure_and_reference_equality(arrays, case):
    k, v, c, s, iters = case
    out = cu.segmented_kmeans(arrays.dev(k), arrays.dev(v), c, s, iters)
    cent, vsum, sizes, offsets, order, assign = (arrays.host(x) for x in out)
    n = len(k)
    assert cent.shape == (c, k.shape[1]) and vsum.shape == (c, v.shape[1]) and sizes.sum() == n
    assert np.array_equal(np.sort(order), np.arange(n))                        # a partition of the tokens
    assert np.array_equal(offsets, np.concatenate([[0], np.cumsum(sizes)]))  # offsets consistent with sizes
    for i in range(c):
        members = order[offsets[i]:offsets[i + 1]]
        assert (assign[members] == i).all() and (np.diff(members) > 0).all()   # token order inside a cluster
        if len(members):    # final centroid = plain mean of the raw keys (the Jensen bound needs it)
            np.testing.assert_allclose(cent[i], k[members].astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(vsum[i], v[members].astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
        else:
            assert not cent[i].any() and not vsum[i].any()
    if arrays.exact:
        want = ref.segmented_kmeans(k, v, c, s, iters)
        for name, x, y in zip(want._fields, (cent, vsum, sizes, offsets, order, assign), want):
            assert np.array_equal(x, y), name


def test_one_cluster_holds_everything(arrays, rng):
    k = rng.standard_normal((13, 4)).astype(np.float32)
    out = cu.segmented_kmeans(arrays.dev(k), arrays.dev(k), 1, 1, 3)
    assert arrays.host(out.sizes).tolist() == [13]
    np.testing.assert_allclose(arrays.host(out.centroids)[0], k.mean(0), atol=1e-6)


def test_segment_sums_are_token_order_float64(arrays, rng):
    x = rng.standard_normal((20, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 20)
    order, offsets, counts = (arrays.host(a) for a in cu.group_by_cluster(arrays.dev(labels), 4))
    sums = arrays.host(cu.cluster_sums(arrays.dev(x), arrays.dev(order), arrays.dev(offsets)))
    want = np.zeros((4, 3))
    np.add.at(want, labels, x.astype(np.float64))
    assert np.array_equal(sums, want) and counts.tolist() == np.bincount(labels, minlength=4).tolist()
