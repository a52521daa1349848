"""RetrievalAttention's attention-aware graph index over keys (NumPy reference).

Decode queries and keys come from different distributions (RetrievalAttention §2.4, Fig. 3): a query
is far from every key, so a key–key proximity graph (HNSW) walks towards keys that are near the
*query region* only by chance and stalls, and IVF centroids rank lists poorly. RetrievalAttention
§3.2 fixes this with the prefill queries, which are available for free: for each prefill query take
its exact k nearest keys by inner product, and link keys that share a query (RoarGraph's projection
of the query–key bipartite graph onto the keys). A decode query, being like the prefill queries,
then finds its top keys in a few hops. The build, one graph per query head over its group's keys:

1. ``knn``: exact ``n_query_neighbors`` nearest keys of every prefill query (blocked matmul).
2. ``project``: each query's top-1 key (the *target*) takes the query's other neighbours as
   candidate out-edges; candidates from all queries sharing a target are pooled, sorted by distance
   to the target and pruned by the occlusion rule (keep ``p`` unless a kept ``r`` is closer to ``p``
   than the target is), keeping at most ``M``.
3. ``add_reverse_edges``: every edge ``u -> v`` adds ``v -> u``; a list that overflows is re-pruned.
4. ``enhance``: lists with room take their node's nearest keys (Euclidean), occlusion-pruned
   (RoarGraph's connectivity enhancement; we use exact key kNN instead of a graph search for it).
5. ``connect``: every key is made reachable from the entry point (the key nearest the key mean).

Search (§3.3) is a greedy beam search with a candidate list of ``L`` entries. Ranking decisions use
float64 inner products so that the reference and the fast path build the same graph below 2048 keys;
above, the fast path's kNN (steps 1 and 4) is an approximate IVF scan, a measured equivalent of this
exact one (see :mod:`retrokv.fast.graph_index`).
Adjacency is ``(n, M)`` int64 padded with ``-1``.
"""
from __future__ import annotations

import bisect
from collections import deque

import sys

import numpy as np

from .baselines import select_topk

__all__ = ["knn", "key_neighbors", "entry_point", "prune", "project", "add_reverse_edges", "enhance",
           "connect", "build_graph", "graph_search"]

METRICS = ("ip", "l2")
_BLOCK = 1024            # rows of queries scored at once: a (1024, n) float32 block, never (T, n)


def knn(queries, keys, k, bias=None, exclude_self=False, select=select_topk):
    """Exact top-``k`` keys of each query by ``q.k + bias_k``: ``(T, k)`` int64, best first.

    Blocked over the queries, so at most a ``(_BLOCK, n)`` score matrix exists at a time. With
    ``exclude_self`` (queries are the keys) a row never returns its own index.
    """
    t, n = len(queries), len(keys)
    k = min(k, n - 1 if exclude_self else n)
    out = np.empty((t, max(k, 0)), dtype=np.int64)
    for s in range(0, t, _BLOCK):
        scores = queries[s:s + _BLOCK] @ keys.T                                  # (block, n)
        if bias is not None:
            scores += bias
        if exclude_self:
            r = np.arange(len(scores))
            scores[r, s + r] = -np.inf
        out[s:s + _BLOCK] = select(scores, k)
    return out


def key_neighbors(keys, k, select=select_topk):
    """Each key's ``k`` nearest other keys in Euclidean distance: argmax of ``k_i.k_j - |k_j|^2 / 2``."""
    bias = (-0.5 * (keys.astype(np.float64) ** 2).sum(1)).astype(np.float32)     # (n,)
    return knn(keys, keys, k, bias=bias, exclude_self=True, select=select)


def entry_point(keys):
    """The key nearest (Euclidean) to the mean key: the search starts here (RoarGraph)."""
    x = keys.astype(np.float64)
    return int(np.argmin(((x - x.mean(0)) ** 2).sum(1)))


def _dist(a, b, metric):
    """Pairwise distances ``(len(a), len(b))`` in float64: ``-a.b`` (inner product) or ``|a - b|^2``."""
    ip = a @ b.T
    if metric == "ip":
        return -ip
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * ip


def prune(target, pool, keys64, m, metric):
    """Occlusion rule (NSG/RoarGraph) around ``target``: ``pool`` candidates (any order) -> at most ``m``.

    Candidates are visited nearest-to-target first (ties: lower id); ``p`` is kept unless some
    already kept ``r`` has ``dist(r, p) < dist(target, p)``: then ``r`` already leads towards ``p``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) == 0:
        return pool
    dt = _dist(keys64[target][None], keys64[pool], metric)[0]                    # (m_pool,)
    order = np.lexsort((pool, dt))
    pool, dt = pool[order], dt[order]
    pair = _dist(keys64[pool], keys64[pool], metric)                             # (m_pool, m_pool)
    kept = []
    for i in range(len(pool)):
        if len(kept) == m:
            break
        if not kept or not (pair[kept, i] < dt[i]).any():
            kept.append(i)
    return pool[kept]


def _lists_to_adj(lists, n, m):
    adj = np.full((n, m), -1, dtype=np.int64)
    for v, lst in enumerate(lists):
        adj[v, :len(lst)] = lst
    return adj


def project(nbrs, keys, m, pool_cap, metric):
    """RoarGraph projection of query neighbour lists ``nbrs (T, Nq)`` onto a key graph ``(n, m)``."""
    n = len(keys)
    keys64 = keys.astype(np.float64)
    pools = [[] for _ in range(n)]
    for row in nbrs:                                    # queries in order: pooled candidates per target
        pools[row[0]].extend(row[1:].tolist())
    lists = []
    for v in range(n):
        if not pools[v]:
            lists.append([])
            continue
        pool = np.unique(np.asarray(pools[v], dtype=np.int64))
        pool = pool[pool != v]
        if len(pool) > pool_cap:                        # keep the pool_cap nearest to the target
            d = _dist(keys64[v][None], keys64[pool], metric)[0]
            pool = pool[np.lexsort((pool, d))[:pool_cap]]
        lists.append(prune(v, pool, keys64, m, metric).tolist())
    return _lists_to_adj(lists, n, m)


def add_reverse_edges(adj, keys, metric):
    """Add ``v -> u`` for every ``u -> v``; a list longer than ``M`` is re-pruned (from the same graph)."""
    n, m = adj.shape
    keys64 = keys.astype(np.float64)
    incoming = [[] for _ in range(n)]
    for u in range(n):
        for v in adj[u][adj[u] >= 0]:
            incoming[v].append(u)
    lists = []
    for v in range(n):
        out = adj[v][adj[v] >= 0].tolist()
        pool = out + [u for u in incoming[v] if u not in set(out)]
        lists.append(pool if len(pool) <= m else prune(v, pool, keys64, m, metric).tolist())
    return _lists_to_adj(lists, n, m)


def enhance(adj, keys, knbrs, metric):
    """Fill free slots with the node's nearest keys ``knbrs (n, K)``, skipping occluded ones.

    Candidates come nearest first; one is added unless it is already a neighbour or a current
    neighbour occludes it (same rule as :func:`prune`). Gives key-like queries a way around.
    """
    n, m = adj.shape
    keys64 = keys.astype(np.float64)
    adj = adj.copy()
    for v in range(n):
        deg = int((adj[v] >= 0).sum())
        for c in knbrs[v]:
            if deg == m:
                break
            cur = adj[v, :deg]
            if c in cur:
                continue
            dvc = _dist(keys64[v][None], keys64[c][None], metric)[0, 0]
            if deg and (_dist(keys64[cur], keys64[c][None], metric)[:, 0] < dvc).any():
                continue
            adj[v, deg] = c
            deg += 1
    return adj


def _mark(adj, start, reached):
    """Breadth-first search from ``start`` over unreached nodes; marks them in place."""
    queue = deque([start])
    reached[start] = True
    while queue:
        u = queue.popleft()
        for w in adj[u]:
            if w >= 0 and not reached[w]:
                reached[w] = True
                queue.append(w)


def connect(adj, knbrs, entry):
    """Make every node reachable from ``entry``, keeping every degree at most ``M``.

    Passes over the unreached nodes in id order link ``w -> u`` from ``u``'s nearest reached key
    ``w`` that has a free slot. If a pass links nothing, the lowest unreached ``u`` takes the last
    slot of the lowest-id reached node with a free slot (or of ``entry``, whose displaced neighbour
    ``x`` then hangs off ``u``: anything reachable only through ``u`` was unreached anyway).
    """
    adj = adj.copy()
    n, m = adj.shape
    reached = np.zeros(n, dtype=bool)
    _mark(adj, entry, reached)
    deg = (adj >= 0).sum(1)
    while not reached.all():
        linked = False
        for u in np.flatnonzero(~reached):
            if reached[u]:
                continue
            for w in knbrs[u]:
                if reached[w] and deg[w] < m:
                    adj[w, deg[w]] = u
                    deg[w] += 1
                    _mark(adj, u, reached)
                    linked = True
                    break
        if linked or reached.all():
            continue
        u = int(np.flatnonzero(~reached)[0])
        free = np.flatnonzero(reached & (deg < m))
        if len(free):
            w = int(free[0])
            adj[w, deg[w]] = u
            deg[w] += 1
        else:
            x = adj[entry, m - 1]
            adj[entry, m - 1] = u
            if x not in adj[u]:
                if deg[u] < m:
                    adj[u, deg[u]] = x
                    deg[u] += 1
                else:
                    adj[u, m - 1] = x
        _mark(adj, u, reached)
    return adj


def build_graph(queries, keys, n_query_neighbors, m, pool_cap, metric, enhance_edges=True, knbrs=None,
                ops=None):
    """One attention-aware graph from prefill ``queries (T, d)`` over ``keys (n, d)``: ``(adj, entry)``.

    The build of RetrievalAttention §3.2 (RoarGraph's recipe), written once for every backend:

    1. ``knn``: each prefill query's ``n_query_neighbors`` nearest keys (max inner product);
    2. ``project``: each key links to the keys that share a query with it, pruned to ``m`` by occlusion;
    3. ``add_reverse_edges``: the projected edges in reverse, where a slot is free;
    4. ``enhance``: free slots take nearest-key edges (connectivity enhancement);
    5. ``connect``: every node reachable from ``entry``.

    ``knbrs`` (each key's nearest keys) may be passed in: it is shared by the heads of a GQA group.
    ``ops``: the module whose kernels run the steps (default: this one; :mod:`retrokv.fast.graph_index`
    passes itself).
    """
    ops = _THIS if ops is None else ops
    n = len(keys)
    if n == 0:
        return np.full((0, m), -1, dtype=np.int64), 0
    if knbrs is None:
        knbrs = ops.key_neighbors(keys, m)
    entry = ops.entry_point(keys)
    adj = np.full((n, m), -1, dtype=np.int64)
    if len(queries):
        adj = ops.project(ops.knn(queries, keys, n_query_neighbors), keys, m, pool_cap, metric)   # 1-2
        adj = ops.add_reverse_edges(adj, keys, metric)                                            # 3
    if enhance_edges:
        adj = ops.enhance(adj, keys, knbrs, metric)                                               # 4
    return ops.connect(adj, knbrs, entry), entry                                                  # 5


def _search_one(q64, keys, adj, entry, k, L):
    """Greedy beam search: expand the best unexpanded candidate until all L best are expanded."""
    visited = np.zeros(len(keys), dtype=bool)
    visited[entry] = True
    pool = [(-float(keys[entry].astype(np.float64) @ q64), int(entry))]           # sorted by (-score, id)
    expanded = set()
    scanned = 1
    while True:
        nxt = next((c for c in pool if c[1] not in expanded), None)
        if nxt is None:
            break
        expanded.add(nxt[1])
        nb = adj[nxt[1]]
        nb = nb[nb >= 0]
        nb = nb[~visited[nb]]
        if len(nb) == 0:
            continue
        visited[nb] = True
        scanned += len(nb)
        for s, j in zip(keys[nb].astype(np.float64) @ q64, nb):
            item = (-float(s), int(j))
            if len(pool) < L or item < pool[-1]:
                bisect.insort(pool, item)
                del pool[L:]
    return [j for _, j in pool[:k]], scanned


def graph_search(q, keys, adj, entry, k, L):
    """Beam search of every query ``q (Hq, B, d)`` in its head's graph ``adj (Hq, n, M)`` from ``entry (Hq,)``.

    Query head ``h`` searches the keys of KV head ``h // G``. Returns ``(ids (Hq, B, k), n_scanned
    (Hq, B))``: ids best first (ties: lower id), ``-1``-padded; ``n_scanned`` counts keys scored.
    With ``L >= n`` every reachable key is kept, so the result is the exact top-k.
    """
    hq, b, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    L = max(int(L), int(k))
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    scanned = np.zeros((hq, b), dtype=np.int64)
    if n == 0:
        return ids, scanned
    for h in range(hq):
        for i in range(b):
            got, scanned[h, i] = _search_one(q[h, i].astype(np.float64), keys[h // g], adj[h], entry[h], k, L)
            ids[h, i, :len(got)] = got
    return ids, scanned


_THIS = sys.modules[__name__]
