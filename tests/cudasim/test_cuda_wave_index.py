"""RetroInfer's tripartite-attention kernels (fast/cuda/wave_index.py): each against the reference, and
composed in the reference driver's order (the module is the driver's ``ops``)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cuda_helpers import upto
from retrokv.fast.cuda import wave_index as cu
from retrokv.reference import wave_index as ref
from retrokv.reference.clustering import plan_clusters

OPS = ("rank_clusters", "select_zones", "gather_execution_buffer", "estimate_partial", "partial_attention",
       "merge_partials")


def tripartite(ops, q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale, group_rank="softmax_sum",
               radii=None, radius_weight=0.0, n_plain=0):
    """The reference driver with the CUDA kernels as ``ops``; also returns the zones and the buffer."""
    bufs = []

    def gather(retrieval):
        bufs.append(ops.gather_execution_buffer(meta, steady_k, steady_v, steady_ids, retrieval))
        return bufs[-1]

    out, lse, zones = ref.tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate,
                                               scale, gather=gather, ops=ops, group_rank=group_rank, radii=radii,
                                               radius_weight=radius_weight, n_plain=n_plain)
    return out, lse, zones.retrieval, zones.estimation, bufs[-1]


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 4))
    d = draw(st.sampled_from([2, 7, 16]))
    dv = draw(st.sampled_from([3, d]))
    n = draw(st.integers(0, upto(70, 3000)))                    # GPU: several 128-cluster tiles
    s = draw(st.integers(0, 6))                                  # steady tokens (sinks + window)
    tpc = draw(st.sampled_from([4, 8, 100]))                     # 100: a single cluster
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    k = (rng.standard_normal((hkv, s + n, d)) + 1.0).astype(np.float32)
    v = rng.standard_normal((hkv, s + n, dv)).astype(np.float32)
    q = (rng.standard_normal((hkv * g, d)) * 1.5).astype(np.float32)
    c, seg = plan_clusters(n, tpc, 40)
    r = draw(st.integers(0, c))                                  # 0: empty retrieval zone
    e = draw(st.integers(0, c - r))                              # 0: empty estimation zone
    w = draw(st.sampled_from([0.0, 0.5]))                       # the ball bound, mixed with the plain ranking
    return k, v, q, s, c, seg, r, e, draw(st.sampled_from(ref.GROUP_RANKS)), w, draw(st.integers(0, r)) if w else 0


def build(arrays, k, v, s, c, seg):
    """The CUDA build and the one the reference kernels read. Under the simulator that is the reference's own
    build (bit-equal: NumPy does the GEMMs); on a GPU, cuBLAS rounds differently from NumPy and a near-tie can
    put a key in another cluster, so the reference kernels read a host copy of the CUDA build (the k-means
    itself is held to its invariants in test_cuda_clustering.py)."""
    meta_c = cu.build_meta_index(arrays.dev(k[:, s:]), arrays.dev(v[:, s:]), np.arange(s, k.shape[1]), c, seg, 3)
    if not arrays.exact:
        return meta_c, ref.MetaIndex(*(arrays.host(x) for x in meta_c))
    meta_r = ref.build_meta_index(k[:, s:], v[:, s:], np.arange(s, k.shape[1]), c, seg, 3)
    return meta_c, meta_r


def test_module_is_a_driver_ops():
    for name in OPS:
        assert callable(getattr(cu, name)), name


@settings(max_examples=20, deadline=None)
@given(cases())
def test_each_kernel_matches_reference(arrays, case):
    k, v, q, s, c, seg, r, e, gr, w, npl = case
    meta_c, meta_r = build(arrays, k, v, s, c, seg)
    radii = ref.cluster_radii(meta_r)
    if arrays.exact:
        assert all(np.array_equal(x, y) for x, y in zip(meta_c, meta_r))
        # the radii kernel on the same clusters (on a GPU the k-means may differ: compared on copies below)
        np.testing.assert_allclose(arrays.host(cu.cluster_radii(meta_c)), radii, rtol=1e-5, atol=1e-6)
    else:
        want = ref.cluster_radii(ref.MetaIndex(*(arrays.host(x) for x in meta_c)))
        np.testing.assert_allclose(arrays.host(cu.cluster_radii(meta_c)), want, rtol=1e-5, atol=1e-6)
    scale = 1 / np.sqrt(k.shape[2])
    sc, rc = cu.rank_clusters(arrays.dev(q), meta_c.centroids, meta_c.sizes, scale, gr, arrays.dev(radii), w,
                              npl)
    sr, rr = ref.rank_clusters(q, meta_r.centroids, meta_r.sizes, scale, gr, radii, w, npl)
    np.testing.assert_array_equal(arrays.host(sc), sr) if arrays.exact else \
        np.testing.assert_allclose(arrays.host(sc), sr, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(arrays.host(rc), rr, atol=1e-6, rtol=1e-5)
    # zones from the same ranking are identical (a stable sort; ties to the lower id)
    for x, y in zip(cu.select_zones(arrays.dev(rr), r, e), ref.select_zones(rr, r, e)):
        assert np.array_equal(arrays.host(x), y)
    ret, est = ref.select_zones(rr, r, e)
    bc = cu.gather_execution_buffer(meta_c, arrays.dev(k[:, :s]), arrays.dev(v[:, :s]), np.arange(s), arrays.dev(ret))
    br = ref.gather_execution_buffer(meta_r, k[:, :s], v[:, :s], np.arange(s), ret)
    assert np.array_equal(bc.lengths, br.lengths)
    for x, y in zip(bc[:3], br[:3]):
        for h in range(k.shape[0]):
            assert np.array_equal(arrays.host(x)[h, :br.lengths[h]], y[h, :br.lengths[h]])
    oc, lc = (arrays.host(x) for x in cu.estimate_partial(arrays.dev(sr), meta_c.sizes, meta_c.value_sums, arrays.dev(est)))
    orf, lrf = ref.estimate_partial(sr, meta_r.sizes, meta_r.value_sums, est)
    assert np.array_equal(np.isneginf(lc), np.isneginf(lrf))                   # empty zones agree
    np.testing.assert_allclose(oc, orf, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(lc[np.isfinite(lrf)], lrf[np.isfinite(lrf)], atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(cases())
def test_composed_step_equals_reference_driver(arrays, case):
    k, v, q, s, c, seg, r, e, gr, w, npl = case
    meta_c, meta_r = build(arrays, k, v, s, c, seg)
    radii = ref.cluster_radii(meta_r)
    scale = 1 / np.sqrt(k.shape[2])
    out, lse, ret, est, buf = tripartite(cu, arrays.dev(q), meta_c, arrays.dev(k[:, :s]), arrays.dev(v[:, :s]),
                                         arrays.dev(np.arange(s)), r, e, scale, gr, arrays.dev(radii), w, npl)
    want, want_lse, zones = ref.tripartite_attention(q, meta_r, k[:, :s], v[:, :s], np.arange(s), r, e, scale,
                                                     group_rank=gr, radii=radii, radius_weight=w, n_plain=npl)
    assert np.array_equal(arrays.host(ret), zones.retrieval) and np.array_equal(arrays.host(est), zones.estimation)
    np.testing.assert_allclose(arrays.host(out), want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(arrays.host(lse), want_lse, atol=2e-5, rtol=1e-5)
    # the optional one-launch exact partial equals the per-head slices the driver takes
    one = cu.attend_execution_buffer(arrays.dev(q), buf, scale)
    g = q.shape[0] // k.shape[0]
    per_head = [cu.partial_attention(arrays.dev(q[h * g:(h + 1) * g]), buf.keys[h:h + 1, :int(buf.lengths[h])],
                                     buf.values[h:h + 1, :int(buf.lengths[h])], scale=scale) for h in range(k.shape[0])]
    for i in range(2):
        np.testing.assert_allclose(arrays.host(one[i]), np.concatenate([arrays.host(p[i]) for p in per_head]), atol=1e-6)


def test_full_budget_is_full_attention(arrays, rng):
    """Every cluster retrieved: the step is exact attention over all tokens (RetroInfer's 100% budget)."""
    k = rng.standard_normal((2, 50, 8)).astype(np.float32)
    v = rng.standard_normal((2, 50, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    c, seg = plan_clusters(46, 8, 40)
    meta, _ = build(arrays, k, v, 4, c, seg)
    out, lse, *_ = tripartite(cu, arrays.dev(q), meta, arrays.dev(k[:, :4]), arrays.dev(v[:, :4]),
                              arrays.dev(np.arange(4)), c, 0, 1 / np.sqrt(8))
    want, want_lse = ref.partial_attention(q, k, v)
    np.testing.assert_allclose(arrays.host(out), want, atol=2e-6)
    np.testing.assert_allclose(arrays.host(lse), want_lse, atol=2e-6)


def test_estimate_equals_pseudo_token_attention(arrays, rng):
    """Eq. 2's weighted flash-decoding is attention over pseudo-tokens ``[C_i, log s_i / scale]``."""
    k = (rng.standard_normal((1, 60, 4)) + 1).astype(np.float32)
    v = rng.standard_normal((1, 60, 4)).astype(np.float32)
    q = rng.standard_normal((2, 4)).astype(np.float32)
    meta_c, meta_r = build(arrays, k, v, 0, 8, 1)
    scores, _ = ref.rank_clusters(q, meta_r.centroids, meta_r.sizes, 0.5)
    est = np.arange(8)[None]
    got = cu.estimate_partial(arrays.dev(scores), meta_c.sizes, meta_c.value_sums, arrays.dev(est))
    want = ref.estimation_as_pseudo_tokens(q, meta_r.centroids, meta_r.sizes, meta_r.value_sums, est, 0.5)
    np.testing.assert_allclose(arrays.host(got[0]), want[0], atol=1e-5)
    np.testing.assert_allclose(arrays.host(got[1]), want[1], atol=1e-5)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs_build(arrays, n, rng):
    k = rng.standard_normal((2, n, 4)).astype(np.float32)
    meta = cu.build_meta_index(arrays.dev(k), arrays.dev(k), np.arange(n), *plan_clusters(n, 4, 40), 3)
    assert arrays.host(meta.sizes).sum() == 2 * n and meta.offsets.shape == (2, plan_clusters(n, 4, 40)[0] + 1)
