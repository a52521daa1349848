"""Attention-aware graph index, fast path: Numba twins of ``reference/graph_index.py``.

* kNN of the prefill queries and of the keys (RetrievalAttention §3.2, step 1; RoarGraph's enhancement
  edges): below ``_IVF_MIN_KEYS`` keys, the reference's blocked BLAS matmul with a fused Numba top-k
  selection (same ids as the reference, ties included). Above, an IVF scan: the keys of a KV head are
  clustered once and each query scores only the keys of its best clusters (10%, at least ``4k``), with a
  self-check against the exact lists of 64 queries. **Not bit-equal** to the reference there: a
  measured equivalence instead (kNN recall ~0.87 on SmolLM2; the same search recall@100 at the same keys
  scored, benchmarks/results/ood_recall.md; properties in tests/test_graph_build_fast.py). The IVF scan
  lives in :mod:`retrokv.fast._ivf_knn`.
* projection, reverse edges and enhancement: parallel over target nodes; each node's pruning is the
  occlusion rule on float64 distances computed on the fly (no pool x pool matrix), ``fastmath`` so
  the dot products vectorise (the same decisions as the reference's BLAS float64 but for exact ties).
* connectivity repair: sequential (it is a graph traversal), O(n M) per pass.
* search: one greedy beam search per (query head, query) in parallel threads, each with a visited
  bitmap (``n / 64`` words) and a fixed-size sorted candidate list of ``L`` entries.

The entry point and the kNN driver are not hot and are imported from the reference.
"""
from __future__ import annotations

import sys

import numba as nb
import numpy as np

from ..reference import graph_index as _ref
from ..reference.graph_index import entry_point
from ..reference.graph_index import knn as _knn_ref
from . import _ivf_knn as _ivf
from ._dispatch import require_numpy
from ._topk import select_block

__all__ = ["knn", "key_neighbors", "entry_point", "prune", "project", "add_reverse_edges", "enhance",
           "connect", "build_graph", "graph_search"]

_IP, _L2 = 0, 1


def _code(metric):
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    return _IP if metric == "ip" else _L2


_BLOCK = _ref._BLOCK     # rows scored per BLAS call: the reference's blocks, so the scores are the same bits


def knn(queries, keys, k, bias=None, exclude_self=False, select=None):
    """Same contract as :func:`retrokv.reference.graph_index.knn`; the same answer below ``_IVF_MIN_KEYS`` keys.

    With at least ``_IVF_MIN_KEYS`` keys (and a scan of at most a quarter of them), the approximate
    :func:`retrokv.fast._ivf_knn._ivf_knn` (RetrievalAttention §3.2 needs the lists only for the projection, which tolerates
    misses: measured in benchmarks/results/ood_recall.md). Otherwise exact:

    The scores are the reference's BLAS calls on the same ``_BLOCK``-row blocks (OpenBLAS rounds
    differently for other block shapes or thread splits, so the blocks are kept: same bits as the
    reference in the same process); the bias, the self exclusion and the top-k selection are one
    fused Numba pass per block (:func:`select_block`). ``select`` (a ``select_topk``-like callable)
    runs the reference driver with it instead.
    """
    require_numpy("knn", queries, keys)
    if select is not None:
        return _knn_ref(queries, keys, k, bias=bias, exclude_self=exclude_self, select=select)
    t, n = len(queries), len(keys)
    k = min(k, n - 1 if exclude_self else n)
    if t and _ivf._use_ivf(n, k):
        return _ivf._ivf_knn(queries, keys, k, bias=bias, exclude_self=exclude_self)
    out = np.empty((t, max(k, 0)), dtype=np.int64)
    if k <= 0 or t == 0:
        return out
    use_bias = bias is not None
    b = np.ascontiguousarray(bias) if use_bias else np.zeros(1, dtype=np.float32)
    for s in range(0, t, _BLOCK):
        scores = queries[s:s + _BLOCK] @ keys.T                                  # (block, n), as the reference
        select_block(np.ascontiguousarray(scores), int(k), b, use_bias, np.int64(s), bool(exclude_self),
                      out, np.int64(s))
    return out


def key_neighbors(keys, k, select=None):
    """Same contract as :func:`retrokv.reference.graph_index.key_neighbors` (approximate like :func:`knn`
    above ``_IVF_MIN_KEYS`` keys: the IVF scan ranks clusters by Euclidean distance)."""
    bias = (-0.5 * (keys.astype(np.float64) ** 2).sum(1)).astype(np.float32)
    return knn(keys, keys, k, bias=bias, exclude_self=True, select=select)


@nb.njit(cache=True, inline="always")
def _dist(keys64, norms, a, b, metric):
    s = 0.0
    for x in range(keys64.shape[1]):
        s += keys64[a, x] * keys64[b, x]
    if metric == _IP:
        return -s
    return norms[a] + norms[b] - 2.0 * s


@nb.njit(cache=True, fastmath=True)
def _prune(target, pool, keys64, norms, m, metric, out):
    """Occlusion pruning of ``pool`` around ``target`` into ``out``; returns the number kept."""
    pool = np.sort(pool)                                   # ties in distance break by the lower id
    dt = np.empty(len(pool), dtype=np.float64)
    for i in range(len(pool)):
        dt[i] = _dist(keys64, norms, target, pool[i], metric)
    order = np.argsort(dt, kind="mergesort")
    kept = 0
    for o in order:
        if kept == m:
            break
        p = pool[o]
        ok = True
        for r in range(kept):
            if _dist(keys64, norms, out[r], p, metric) < dt[o]:
                ok = False
                break
        if ok:
            out[kept] = p
            kept += 1
    return kept


def prune(target, pool, keys64, m, metric):
    """Same contract as :func:`retrokv.reference.graph_index.prune`; the Numba kernel the build uses."""
    keys64 = np.ascontiguousarray(keys64, dtype=np.float64)
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) == 0:
        return pool
    out = np.full(m, -1, dtype=np.int64)
    kept = _prune(np.int64(target), pool, keys64, (keys64 * keys64).sum(1), int(m), _code(metric), out)
    return out[:kept]


@nb.njit(parallel=True, cache=True, fastmath=True)
def _project(nbrs, q_order, q_ptr, targets, keys64, norms, m, pool_cap, metric, nchunk):
    """Prune each target's pooled candidates; ``targets`` (keys with queries) heaviest first.

    Two things make this fast on real prefill queries, where a few keys are the nearest key of
    hundreds of queries (SmolLM2: one key takes 1671 of 8192 queries at 8K): the pool is
    de-duplicated by a per-chunk stamp array (linear in the pooled ids; the reference's
    ``np.unique`` sorts all ~165K of them), and the targets are dealt round-robin to the chunks
    heaviest first, so one thread does not get all the heavy ones.
    """
    n = keys64.shape[0]
    nq = nbrs.shape[1]
    adj = np.full((n, m), -1, dtype=np.int64)
    for ch in nb.prange(nchunk):
        seen = np.full(n, -1, dtype=np.int64)          # seen[u] == v: u is already in v's pool
        buf = np.empty(n, dtype=np.int64)
        for j in range(ch, len(targets), nchunk):
            v = targets[j]
            seen[v] = v                                 # the target is never its own candidate
            cnt = 0
            for t in range(q_ptr[v], q_ptr[v + 1]):
                for x in range(1, nq):
                    u = nbrs[q_order[t], x]
                    if seen[u] != v:
                        seen[u] = v
                        buf[cnt] = u
                        cnt += 1
            pool = np.sort(buf[:cnt])                   # as np.unique: ascending ids
            if len(pool) > pool_cap:                    # keep the pool_cap nearest to the target
                d = np.empty(len(pool), dtype=np.float64)
                for i in range(len(pool)):
                    d[i] = _dist(keys64, norms, v, pool[i], metric)
                pool = pool[np.argsort(d, kind="mergesort")[:pool_cap]]
            _prune(v, pool, keys64, norms, m, metric, adj[v])
    return adj


def project(nbrs, keys, m, pool_cap, metric):
    """Same contract as :func:`retrokv.reference.graph_index.project`; parallel over targets."""
    keys64 = keys.astype(np.float64)
    n = len(keys)
    nbrs = np.ascontiguousarray(nbrs, dtype=np.int64)
    q_order = np.argsort(nbrs[:, 0], kind="stable").astype(np.int64)           # queries grouped by target
    per = np.bincount(nbrs[:, 0], minlength=n)
    q_ptr = np.zeros(n + 1, dtype=np.int64)
    q_ptr[1:] = np.cumsum(per)
    targets = np.nonzero(per)[0]
    targets = targets[np.argsort(-per[targets], kind="stable")].astype(np.int64)   # heaviest first
    return _project(nbrs, q_order, q_ptr, targets, keys64, (keys64 * keys64).sum(1), m, pool_cap, _code(metric),
                    min(len(targets), 4 * nb.get_num_threads()))


@nb.njit(parallel=True, cache=True, fastmath=True)
def _reverse(adj, keys64, norms, metric):
    n, m = adj.shape
    cnt = np.zeros(n + 1, dtype=np.int64)
    for u in range(n):
        for j in range(m):
            if adj[u, j] >= 0:
                cnt[adj[u, j] + 1] += 1
    ptr = np.cumsum(cnt)
    src = np.empty(ptr[n], dtype=np.int64)
    fill = ptr[:n].copy()
    for u in range(n):                                     # in-lists in ascending source order
        for j in range(m):
            v = adj[u, j]
            if v >= 0:
                src[fill[v]] = u
                fill[v] += 1
    new = np.full((n, m), -1, dtype=np.int64)
    for v in nb.prange(n):
        pool = np.empty(m + ptr[v + 1] - ptr[v], dtype=np.int64)
        size = 0
        for j in range(m):
            if adj[v, j] >= 0:
                pool[size] = adj[v, j]
                size += 1
        deg = size
        for t in range(ptr[v], ptr[v + 1]):
            u = src[t]
            dup = False
            for j in range(deg):
                if pool[j] == u:
                    dup = True
                    break
            if not dup:
                pool[size] = u
                size += 1
        if size <= m:
            new[v, :size] = pool[:size]
        else:
            _prune(v, pool[:size], keys64, norms, m, metric, new[v])
    return new


def add_reverse_edges(adj, keys, metric):
    """Same contract as :func:`retrokv.reference.graph_index.add_reverse_edges`."""
    keys64 = keys.astype(np.float64)
    return _reverse(np.ascontiguousarray(adj, dtype=np.int64), keys64, (keys64 * keys64).sum(1), _code(metric))


@nb.njit(parallel=True, cache=True, fastmath=True)
def _enhance(adj, knbrs, keys64, norms, metric):
    n, m = adj.shape
    for v in nb.prange(n):
        deg = 0
        while deg < m and adj[v, deg] >= 0:
            deg += 1
        for c in knbrs[v]:
            if deg == m:
                break
            skip = False
            dvc = _dist(keys64, norms, v, c, metric)
            for j in range(deg):
                if adj[v, j] == c or _dist(keys64, norms, adj[v, j], c, metric) < dvc:
                    skip = True
                    break
            if not skip:
                adj[v, deg] = c
                deg += 1
    return adj


def enhance(adj, keys, knbrs, metric):
    """Same contract as :func:`retrokv.reference.graph_index.enhance`; parallel over nodes."""
    keys64 = keys.astype(np.float64)
    return _enhance(np.array(adj, dtype=np.int64), np.ascontiguousarray(knbrs, dtype=np.int64), keys64,
                    (keys64 * keys64).sum(1), _code(metric))


@nb.njit(cache=True)
def _mark(adj, start, reached, queue):
    reached[start] = True
    queue[0] = start
    head, tail = 0, 1
    while head < tail:
        u = queue[head]
        head += 1
        for w in adj[u]:
            if w >= 0 and not reached[w]:
                reached[w] = True
                queue[tail] = w
                tail += 1


@nb.njit(cache=True)
def _connect(adj, knbrs, entry):
    n, m = adj.shape
    reached = np.zeros(n, dtype=np.bool_)
    queue = np.empty(n, dtype=np.int64)
    _mark(adj, entry, reached, queue)
    deg = np.zeros(n, dtype=np.int64)
    for u in range(n):
        while deg[u] < m and adj[u, deg[u]] >= 0:
            deg[u] += 1
    while not reached.all():
        linked = False
        for u in range(n):
            if reached[u]:
                continue
            for w in knbrs[u]:
                if reached[w] and deg[w] < m:
                    adj[w, deg[w]] = u
                    deg[w] += 1
                    _mark(adj, u, reached, queue)
                    linked = True
                    break
        if linked or reached.all():
            continue
        u = np.flatnonzero(~reached)[0]
        free = np.flatnonzero(reached & (deg < m))
        if len(free):
            w = free[0]
            adj[w, deg[w]] = u
            deg[w] += 1
        else:
            x = adj[entry, m - 1]
            adj[entry, m - 1] = u
            if not (adj[u] == x).any():
                if deg[u] < m:
                    adj[u, deg[u]] = x
                    deg[u] += 1
                else:
                    adj[u, m - 1] = x
        _mark(adj, u, reached, queue)
    return adj


def connect(adj, knbrs, entry):
    """Same contract as :func:`retrokv.reference.graph_index.connect`."""
    return _connect(np.array(adj, dtype=np.int64), np.ascontiguousarray(knbrs, dtype=np.int64), np.int64(entry))


def build_graph(queries, keys, n_query_neighbors, m, pool_cap, metric, enhance_edges=True, knbrs=None,
                ops=None):
    """The reference driver :func:`retrokv.reference.graph_index.build_graph` with this module's kernels."""
    require_numpy("build_graph", queries, keys)
    return _ref.build_graph(queries, keys, n_query_neighbors, m, pool_cap, metric, enhance_edges, knbrs,
                            ops=sys.modules[__name__] if ops is None else ops)


@nb.njit(parallel=True, cache=True)
def _search(q, keys, adj, entry, k, L, g):
    hq, b, d = q.shape
    n = keys.shape[1]
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    scanned = np.zeros((hq, b), dtype=np.int64)
    for item in nb.prange(hq * b):
        h, i = item // b, item % b
        kv = h // g
        visited = np.zeros((n + 63) // 64, dtype=np.uint64)
        ps = np.empty(L, dtype=np.float64)                # candidate list: score desc, id asc
        pi = np.empty(L, dtype=np.int64)
        done = np.zeros(L, dtype=np.bool_)
        e = entry[h]
        visited[e >> 6] |= np.uint64(1) << np.uint64(e & 63)
        s = 0.0
        for x in range(d):
            s += np.float64(q[h, i, x]) * np.float64(keys[kv, e, x])
        ps[0], pi[0], done[0] = s, e, False
        cnt, cur, sc = 1, 0, 1
        while True:
            while cur < cnt and done[cur]:
                cur += 1
            if cur >= cnt:
                break
            done[cur] = True
            node = pi[cur]
            low = cnt
            for t in range(adj.shape[2]):
                j = adj[h, node, t]
                if j < 0:
                    break
                word, bit = j >> 6, np.uint64(1) << np.uint64(j & 63)
                if visited[word] & bit:
                    continue
                visited[word] |= bit
                s = 0.0
                for x in range(d):
                    s += np.float64(q[h, i, x]) * np.float64(keys[kv, j, x])
                sc += 1
                if cnt == L and not (s > ps[L - 1] or (s == ps[L - 1] and j < pi[L - 1])):
                    continue
                pos = cnt if cnt < L else L - 1
                if cnt < L:
                    cnt += 1
                while pos > 0 and (ps[pos - 1] < s or (ps[pos - 1] == s and pi[pos - 1] > j)):
                    ps[pos], pi[pos], done[pos] = ps[pos - 1], pi[pos - 1], done[pos - 1]
                    pos -= 1
                ps[pos], pi[pos], done[pos] = s, j, False
                low = min(low, pos)
            cur = min(cur, low)
        for t in range(min(k, cnt)):
            ids[h, i, t] = pi[t]
        scanned[h, i] = sc
    return ids, scanned


def graph_search(q, keys, adj, entry, k, L):
    """Same contract as :func:`retrokv.reference.graph_index.graph_search`; parallel over (head, query)."""
    require_numpy("graph_search", q, keys, adj)
    hq, b, d = q.shape
    hkv, n, _ = keys.shape
    if n == 0:
        return np.full((hq, b, k), -1, dtype=np.int64), np.zeros((hq, b), dtype=np.int64)
    return _search(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.float32),
                   np.ascontiguousarray(adj, dtype=np.int64), np.ascontiguousarray(entry, dtype=np.int64),
                   int(k), max(int(L), int(k)), hq // hkv)
