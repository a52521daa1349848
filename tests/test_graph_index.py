"""RetrievalAttention graph index: exactness at L >= n, degree bound, connectivity, OOD recall vs IVF,
fast == reference (same graph, same search: these sizes are below the fast build's IVF kNN threshold,
``fast._ivf_knn._IVF_MIN_KEYS``; above it, tests/test_graph_build_fast.py), attention oracle, validation."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import retrokv.fast._topk as _topk
import retrokv.fast.graph_index as fg
import retrokv.reference.graph_index as rg
from retrokv.baselines import IVFIndex
from retrokv.graph_index import GraphConfig, GraphIndex


@st.composite
def problems(draw, max_n=160):
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    n = draw(st.integers(0, max_n))
    tq = draw(st.integers(0, 60))
    d = draw(st.sampled_from([4, 9, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    k = rng.standard_normal((hkv, n, d)).astype(np.float32)
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    shift = 2 * rng.standard_normal(d).astype(np.float32)          # queries live elsewhere (OOD)
    pq = (rng.standard_normal((hkv * g, tq, d)) + shift).astype(np.float32)
    q = (rng.standard_normal((hkv * g, 3, d)) + shift).astype(np.float32)
    return k, v, pq, q


def exact64(q3, keys, k):
    """Exact top-k by float64 inner product, ties to the lower id, -1 padded."""
    hq, b, _ = q3.shape
    g = hq // keys.shape[0]
    out = np.full((hq, b, k), -1)
    for h in range(hq):
        s = q3[h].astype(np.float64) @ keys[h // g].T.astype(np.float64)
        for i in range(b):
            top = np.lexsort((np.arange(s.shape[1]), -s[i]))[:k]
            out[h, i, :len(top)] = top
    return out


def reachable(adj, entry):
    seen = np.zeros(len(adj), bool)
    seen[entry] = True
    queue = deque([entry])
    while queue:
        for w in adj[queue.popleft()]:
            if w >= 0 and not seen[w]:
                seen[w] = True
                queue.append(w)
    return seen


SMALL = dict(n_sink=0, n_recent=0, n_query_neighbors=12, max_degree=6, pool_cap=30)


@given(problems(), st.sampled_from(["ip", "l2"]), st.booleans(), st.integers(1, 20))
def test_fast_builds_the_same_graph_and_search(data, metric, enhance, k):
    keys, v, pq, q = data
    cfg = GraphConfig(metric=metric, enhance=enhance, search_L=max(k, 8), top_k=k, **SMALL)
    ref = GraphIndex.build(keys, v, pq, config=cfg, backend="reference")
    fast = GraphIndex.build(keys, v, pq, config=cfg, backend="fast")
    np.testing.assert_array_equal(fast.adj, ref.adj)
    np.testing.assert_array_equal(fast.entry, ref.entry)
    for a, b in zip(fast.search(q), ref.search(q)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fast.attend(q[:, 0]), ref.attend(q[:, 0]), atol=1e-5, rtol=1e-4)


@given(problems(), st.sampled_from(["reference", "fast"]), st.integers(1, 30))
def test_graph_invariants_and_exact_search_at_full_list(data, backend, k):
    keys, v, pq, q = data
    idx = GraphIndex.build(keys, v, pq, backend=backend, **SMALL)
    n, m = idx.n_indexed, idx.config.max_degree
    assert idx.adj.shape == (q.shape[0], n, m)
    for h in range(q.shape[0]):
        adj = idx.adj[h]
        for u in range(n):
            row = adj[u][adj[u] >= 0]
            assert (adj[u][len(row):] == -1).all()            # padding only at the end
            assert len(set(row.tolist())) == len(row) and u not in row   # no duplicates, no self-loops
        assert (idx.degrees()[h] <= m).all()
        if n:
            assert reachable(adj, idx.entry[h]).all()          # every key reachable from the entry point
    ids, scanned = idx.search(q, k, L=max(n, 1))               # L >= n: nothing is ever evicted
    np.testing.assert_array_equal(ids, exact64(q, keys, k))
    assert (scanned == n).all()


@given(problems(max_n=120), st.sampled_from(["reference", "fast"]))
def test_attend_with_everything_retrieved_is_full_attention(data, backend):
    keys, v, pq, q = data
    n = keys.shape[1]
    assume(n > 0)
    idx = GraphIndex.build(keys, v, pq, backend=backend, n_sink=2, n_recent=3, top_k=n, search_L=n,
                           n_query_neighbors=10, max_degree=5)
    qd = q[:, 0]
    g = qd.shape[0] // keys.shape[0]
    kk = np.repeat(keys.astype(np.float64), g, 0)
    vv = np.repeat(v.astype(np.float64), g, 0)
    s = np.einsum("hd,hnd->hn", qd.astype(np.float64), kk) / np.sqrt(qd.shape[1])
    p = np.exp(s - s.max(1, keepdims=True))
    expect = np.einsum("hn,hnd->hd", p, vv) / p.sum(1, keepdims=True)
    out, lse = idx.attend(qd, return_lse=True)
    np.testing.assert_allclose(out, expect, atol=2e-5, rtol=1e-4)
    assert idx.last_stats.keys_scored == qd.shape[0] * idx.n_indexed


def test_ood_recall_beats_ivf_at_the_same_budget():
    """Queries from a shifted distribution: at equal keys scored, the graph's recall@k beats IVF's."""
    rng = np.random.default_rng(0)
    n, d, k = 4000, 16, 20
    keys = rng.standard_normal((1, n, d)).astype(np.float32)
    shift = 3 * rng.standard_normal(d)                           # queries far from every key (RA §2.4)
    pq = (rng.standard_normal((1, 2000, d)) + shift).astype(np.float32)
    q = (rng.standard_normal((1, 100, d)) + shift).astype(np.float32)
    truth = exact64(q, keys, k)[0]

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[0], truth)])

    graph = GraphIndex.build(keys, keys, pq, n_sink=0, n_recent=0, backend="fast")
    ids, scanned = graph.search(q, k, L=60)
    budget = scanned.mean()
    ivf = IVFIndex.build(keys, keys, n_sink=0, n_recent=0, backend="fast")
    nprobe = 1
    while True:                                                  # smallest nprobe scanning at least as much
        ivf_ids, ivf_scanned = ivf.search(q, k, nprobe=nprobe)
        if ivf_scanned.mean() >= budget or nprobe == ivf.n_lists:
            break
        nprobe += 1
    assert recall(ids) > recall(ivf_ids), (recall(ids), recall(ivf_ids), budget, ivf_scanned.mean())
    assert recall(ids) >= 0.85


def test_reference_steps_are_the_fast_steps():
    """Each build step separately (project, reverse, enhance, connect) agrees between backends."""
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((300, 8)).astype(np.float32)
    queries = (rng.standard_normal((200, 8)) + 1).astype(np.float32)
    nbrs = rg.knn(queries, keys, 15)
    np.testing.assert_array_equal(fg.knn(queries, keys, 15), nbrs)
    kn = rg.key_neighbors(keys, 7)
    np.testing.assert_array_equal(fg.key_neighbors(keys, 7), kn)
    for metric in ("ip", "l2"):
        adj = rg.project(nbrs, keys, 7, 40, metric)
        np.testing.assert_array_equal(fg.project(nbrs, keys, 7, 40, metric), adj)
        rev = rg.add_reverse_edges(adj, keys, metric)
        np.testing.assert_array_equal(fg.add_reverse_edges(adj, keys, metric), rev)
        enh = rg.enhance(rev, keys, kn, metric)
        np.testing.assert_array_equal(fg.enhance(rev, keys, kn, metric), enh)
        # connect from an empty graph exercises the fallback paths
        empty = np.full_like(adj, -1)
        np.testing.assert_array_equal(fg.connect(empty, kn, 5), rg.connect(empty, kn, 5))
        assert reachable(rg.connect(empty, kn, 5), 5).all()


def test_validation(rng):
    k = rng.standard_normal((2, 30, 8)).astype(np.float32)
    pq = rng.standard_normal((4, 10, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="prefill_queries must have shape"):
        GraphIndex.build(k, k, pq[:3])
    with pytest.raises(ValueError, match="prefill_queries must have shape"):
        GraphIndex.build(k, k, pq[0])
    with pytest.raises(ValueError, match="metric"):
        GraphConfig(metric="cos")
    with pytest.raises(ValueError, match="max_degree"):
        GraphConfig(max_degree=0)
    with pytest.raises(TypeError, match="config must be a GraphConfig"):
        GraphIndex.build(k, k, pq, config={"top_k": 3})
    idx = GraphIndex.build(k, k, pq, n_sink=2, n_recent=2)
    with pytest.raises(ValueError, match="built with 4 query heads"):
        idx.search(rng.standard_normal((2, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="L must be"):
        idx.search(pq[:, 0], L=0)


def test_build_queries_subsamples_the_projection_queries(rng):
    k = rng.standard_normal((1, 96, 8)).astype(np.float32)
    q = rng.standard_normal((2, 40, 8)).astype(np.float32)
    cfg = GraphConfig(n_sink=0, n_recent=0, n_query_neighbors=8, max_degree=6, pool_cap=20)
    full = GraphIndex.build(k, k, q, config=cfg, backend="reference")
    same = GraphIndex.build(k, k, q, config=GraphConfig(**{**cfg.__dict__, "build_queries": 40}), backend="reference")
    fewer = GraphIndex.build(k, k, q, config=GraphConfig(**{**cfg.__dict__, "build_queries": 5}), backend="reference")
    np.testing.assert_array_equal(full.adj, same.adj)          # a cap at Tq changes nothing
    sub = GraphIndex.build(k, k, q[:, np.linspace(0, 39, 5).round().astype(int)], config=cfg, backend="reference")
    np.testing.assert_array_equal(fewer.adj, sub.adj)          # the cap takes evenly strided queries
    with pytest.raises(ValueError, match="build_queries"):
        GraphConfig(build_queries=0)


@given(st.integers(1, 40), st.integers(1, 400), st.integers(1, 60), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_fast_knn_fused_selection_is_the_reference(t, n, k, use_bias, self_keys, seed):
    """The fused bias / self-exclusion / sampled-threshold selection returns the reference knn's ids,
    ties (small integer scores) included, with and without sampling (long rows, small k)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    queries = keys[:min(t, n)] if self_keys else rng.integers(-2, 3, size=(t, 4)).astype(np.float32)
    bias = rng.integers(-2, 3, size=n).astype(np.float32) if use_bias else None
    ref = rg.knn(queries, keys, k, bias=bias, exclude_self=self_keys)
    np.testing.assert_array_equal(fg.knn(queries, keys, k, bias=bias, exclude_self=self_keys), ref)


@given(st.integers(0, 300), st.integers(0, 2**31 - 1))
def test_fast_sort_desc_is_a_stable_argsort(c, seed):
    vals = np.random.default_rng(seed).integers(-4, 5, size=c).astype(np.float32)
    ids = np.arange(c, dtype=np.int64) * 3
    order = np.argsort(-vals, kind="stable")
    v, i = vals.copy(), ids.copy()
    _topk._sort_desc(v, i, c, np.empty(c, np.float32), np.empty(c, np.int64))
    np.testing.assert_array_equal(i, ids[order])
    np.testing.assert_array_equal(v, vals[order])


def test_fast_knn_across_blocks_and_key_neighbors():
    """More rows than one BLAS block: the self exclusion follows the block offset."""
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((fg._BLOCK + 300, 8)).astype(np.float32)
    np.testing.assert_array_equal(fg.key_neighbors(keys, 9), rg.key_neighbors(keys, 9))
    q = (rng.standard_normal((fg._BLOCK + 77, 8)) + 1).astype(np.float32)
    np.testing.assert_array_equal(fg.knn(q, keys, 50), rg.knn(q, keys, 50))
