"""Approximate kNN for large graph builds (fast path only): an IVF scan over the keys of a KV head.

Used by :func:`retrokv.fast.graph_index.knn` when a build has at least ``_IVF_MIN_KEYS`` keys (the
reference build and the fast build below that size compute the exact lists). Why approximate lists are
enough, and what it costs in search recall, is in the comment below and in docs/graph_index.md;
properties in tests/test_graph_build_fast.py.
"""
from __future__ import annotations

import collections

import numba as nb
import numpy as np

from ..reference.graph_index import _BLOCK
from ._dispatch import blas_one_thread
from ._topk import select_block

# IVF over the keys, one layout per KV head.
#
# The exact kNN of every prefill query costs about as many FLOPs as the dense prefill itself
# (T x n x d per query head), and on SmolLM2 keys neither a PCA bound (the top 32 of 64 directions
# hold 71% of the key energy) nor a cheaper kernel removes enough of them. The graph does not need the
# exact lists, though: RoarGraph's projection pools the neighbours of every query sharing a target and
# prunes them to M, so a list that misses its farthest members changes little. Measured on SmolLM2
# Q/K (benchmarks/ood_recall.py, docs/graph_index.md): scanning 10% of the keys (kNN recall ~0.87)
# gives the same search recall@100 at the same keys scored as the exact lists.
_IVF_MIN_KEYS = 2048     # below this the exact kNN is cheap: the build stays bit-equal to the reference
_IVF_SCAN = 0.10         # fraction of the keys each query scores (its nearest clusters first), at least 4k
_IVF_ITERS = 8           # Lloyd iterations of the key k-means
_IVF_CHECK = 64          # queries whose IVF lists are checked against their exact lists
_IVF_MIN_RECALL = 0.7    # below this (keys without cluster structure) the scan doubles, up to exact
_scans = collections.deque(maxlen=4096)   # fraction of the keys each recent IVF kNN scanned (benchmarks/graph_build.py)
_layout_cache = {}       # one entry: the layout of the last keys (shared by key_neighbors and a GQA group)


def _scan_size(n, k):
    """Keys each query scores on the IVF path: ``_IVF_SCAN`` of them, and at least ``4k``."""
    return max(int(_IVF_SCAN * n), 4 * k)


def _use_ivf(n, k):
    """Whether the kNN of ``n`` keys takes the IVF path: enough keys, and the scan is at most a quarter."""
    return n >= _IVF_MIN_KEYS and 4 * _scan_size(n, k) <= n


def _kmeans(keys, c):
    """Euclidean k-means of ``keys (n, d)`` into ``c`` clusters: ``(centroids, assign)``, deterministic.

    Seeds: ``c`` keys drawn with a fixed seed; assignment by ``argmax k.c - |c|^2 / 2`` (one BLAS call);
    an emptied cluster keeps its centroid.
    """
    n = len(keys)
    cent = keys[np.sort(np.random.default_rng(0).choice(n, c, replace=False))].astype(np.float32)
    for it in range(_IVF_ITERS + 1):
        half = (0.5 * (cent.astype(np.float64) ** 2).sum(1)).astype(np.float32)
        assign = np.argmax(keys @ cent.T - half, axis=1)
        if it == _IVF_ITERS:
            break
        order = np.argsort(assign, kind="stable")
        counts = np.bincount(assign, minlength=c)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        nz = counts > 0
        sums = np.add.reduceat(keys[order].astype(np.float64), starts[nz], axis=0)
        cent[nz] = (sums / counts[nz, None]).astype(np.float32)
    return cent, assign


def _layout(keys):
    """IVF layout of ``keys``: ``(centroids (C, d), half |c|^2 (C,), keys by cluster, their ids, offsets (C+1,))``.

    About ``1.5 sqrt(n)`` clusters (~60 keys each at n = 8K). Cached for the last keys seen (by
    content), so the key kNN and every query head of a GQA group share one k-means.
    """
    import hashlib

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    tag = (keys.shape, hashlib.blake2b(keys.view(np.uint8), digest_size=16).digest())
    if tag in _layout_cache:
        return _layout_cache[tag]
    n = len(keys)
    c = max(2, min(n // 16, int(round(1.5 * np.sqrt(n)))))
    cent, assign = _kmeans(keys, c)
    order = np.argsort(assign, kind="stable").astype(np.int64)
    off = np.zeros(c + 1, dtype=np.int64)
    off[1:] = np.cumsum(np.bincount(assign, minlength=c))
    half = (0.5 * (cent.astype(np.float64) ** 2).sum(1)).astype(np.float32)
    lay = (cent, half, np.ascontiguousarray(keys[order]), order, off)
    _layout_cache.clear()
    _layout_cache[tag] = lay
    return lay


_NBUCKET = 256           # score buckets of the per-query selection in _ivf_scan


@nb.njit(cache=True, inline="always")
def _bucket(v, lo, scale):
    """Score ``v``'s bucket in ``[0, _NBUCKET)``: linear from ``lo`` (monotone in ``v``). A score at or
    below ``lo`` (and ``-inf``) goes to bucket 0, and so does every score when a dot product overflowed to
    ``inf`` (``scale`` is then 0 and ``inf * 0`` is NaN): the selection stays exact, only slower."""
    x = (v - lo) * scale
    return min(int(x), _NBUCKET - 1) if x > 0 else 0


@nb.njit(cache=True)
def _top_sorted(sv, si, m, k, lo, hi, hist, tv, ti, out_row):
    """The best ``k`` of the ``m`` scanned candidates ``(sv, si)``, best first (score desc, id asc), into ``out_row``.

    ``lo``, ``hi``: the least and the greatest score above ``-inf`` (the scan tracks them as it scores,
    which saves a pass over the candidates; ``lo = inf`` when there is none).
    Bucket select: scores are binned linearly between their min and max (a monotone map, so every
    candidate scoring at least the k-th best lands in its bucket or above), the histogram gives the
    k-th best's bucket, and the candidates from that bucket up (about ``k`` of them) are scattered
    into ``(tv, ti)`` in bucket order, best bucket first (a counting sort). What is left out of order
    is only within a bucket, so the closing insertion sort is near-linear; on the raw candidates it
    made ~k^2/4 branchy moves per query, the largest cost of the graph build's query kNN at k = 100.
    Branch-light passes over the candidates: a heap updated per key, or a quickselect, cost more than
    the dot products (measured on SmolLM2 keys).
    """
    scale = (_NBUCKET - 1) / (hi - lo) if hi > lo else 0.0
    hist[:] = 0
    for j in range(m):
        v = sv[j]
        bkt = _bucket(v, lo, scale)
        hist[bkt] += 1
    need, cut = k, _NBUCKET - 1
    while cut > 0 and hist[cut] < need:
        need -= hist[cut]
        cut -= 1
    c = 0
    for b in range(_NBUCKET - 1, cut - 1, -1):            # hist[b] becomes bucket b's first slot
        nb_ = hist[b]
        hist[b] = c
        c += nb_
    for j in range(m):                                    # scatter, best bucket first
        v = sv[j]
        bkt = _bucket(v, lo, scale)
        if bkt >= cut:
            p = hist[bkt]
            tv[p], ti[p] = v, si[j]
            hist[bkt] = p + 1
    for x in range(1, c):                                 # insertion sort: score desc, id asc
        v, w = tv[x], ti[x]
        y = x
        while y > 0 and (tv[y - 1] < v or (tv[y - 1] == v and ti[y - 1] > w)):
            tv[y], ti[y] = tv[y - 1], ti[y - 1]
            y -= 1
        tv[y], ti[y] = v, w
    for r in range(k):
        out_row[r] = ti[r]


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def _ivf_scan(queries, cs, kc, ids, off, bias, use_bias, self_ids, k, min_scan, out):
    """Each query scores its best clusters by ``cs`` (best first) until ``>= min_scan`` keys: top-``k`` ids.

    The scanned keys' scores go to a scratch row; one bucket selection per query
    (:func:`_top_sorted`) returns the exact top ``k`` of them, ties by the lower id. ``fastmath`` lets
    LLVM vectorise the float32 dot (the sum order differs from BLAS: near-ties may swap, see ``_ivf_knn``);
    only reassociation, so infinities keep their meaning. Row ``i`` never returns key ``self_ids[i]``
    (``-1``: no exclusion).
    """
    t, d = queries.shape
    c = cs.shape[1]
    n = kc.shape[0]
    nchunk = min(t, 64)
    per = (t + nchunk - 1) // nchunk
    for ch in nb.prange(nchunk):
        taken = np.empty(c, dtype=np.bool_)
        sv = np.empty(n, dtype=np.float32)
        si = np.empty(n, dtype=np.int64)
        hist = np.empty(_NBUCKET, dtype=np.int64)
        tv = np.empty(n, dtype=np.float32)
        ti = np.empty(n, dtype=np.int64)
        for i in range(ch * per, min(t, (ch + 1) * per)):
            taken[:] = False
            m = 0
            got = 0
            lo, hi = np.inf, -np.inf                      # float64, as the bucket arithmetic (no overflow)
            while got < min_scan or m < k:
                best, bc = -np.inf, -1
                for r in range(c):                        # next best cluster (about 10% are taken)
                    if not taken[r] and (bc < 0 or cs[i, r] > best):
                        best, bc = cs[i, r], r
                if bc < 0:
                    break
                taken[bc] = True
                got += off[bc + 1] - off[bc]
                for j in range(off[bc], off[bc + 1]):
                    idx = ids[j]
                    if idx == self_ids[i]:
                        continue
                    v = np.float32(0.0)
                    for x in range(d):
                        v += queries[i, x] * kc[j, x]
                    if use_bias:
                        v += bias[idx]
                    sv[m], si[m] = v, idx
                    m += 1
                    if v > -np.inf:
                        lo = min(lo, np.float64(v))
                        hi = max(hi, np.float64(v))
            _top_sorted(sv, si, m, min(k, m), lo, hi, hist, tv, ti, out[i])


def _ivf_knn(queries, keys, k, bias=None, exclude_self=False):
    """Approximate :func:`knn` (same contract): each query scores the keys of its nearest clusters.

    Clusters are ranked by ``q.c`` (``q.c - |c|^2 / 2`` with the key kNN's bias, i.e. Euclidean) and
    scanned best first until ``_scan_size(n, k)`` keys are covered. Ids best first (ties: lower id),
    as :func:`knn`, but a true neighbour in an unscanned cluster is missed, and the float32 dot
    products are summed in another order than BLAS's, so near-ties may swap. The BLAS calls here (the
    k-means, the cluster scores, the self-check) are small and run on one thread, so that no OpenBLAS
    worker still spins when the parallel scan starts (:func:`~retrokv.fast._dispatch.blas_one_thread`).
    """
    with blas_one_thread():
        return _ivf_knn_one_blas_thread(queries, keys, k, bias, exclude_self)


def _ivf_knn_one_blas_thread(queries, keys, k, bias, exclude_self):
    cent, half, kc, ids, off = _layout(keys)
    t, n = len(queries), len(keys)
    k = min(k, n - 1 if exclude_self else n)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    cs = queries @ cent.T
    if bias is not None:
        cs -= half
    cs = np.ascontiguousarray(cs)
    b = np.ascontiguousarray(bias, dtype=np.float32) if bias is not None else np.zeros(1, dtype=np.float32)
    # Self-check on a strided sample of queries: where the clusters do not separate the neighbours
    # (e.g. isotropic Gaussian keys: recall ~0.5 at a 10% scan), scan twice as many keys, up to all of them.
    scan, sample = _scan_size(n, k), np.unique(np.linspace(0, t - 1, min(t, _IVF_CHECK)).round().astype(np.int64))
    while scan < n:
        got = np.empty((len(sample), k), dtype=np.int64)
        _ivf_scan(queries[sample], cs[sample], kc, ids, off, b, bias is not None,
                  sample if exclude_self else np.full(len(sample), -1, dtype=np.int64), int(k), scan, got)
        exact = queries[sample] @ keys.T                   # (64, n): the sample's exact scores
        if bias is not None:
            exact += bias
        if exclude_self:
            exact[np.arange(len(sample)), sample] = -np.inf
        want = np.argpartition(-exact, k - 1, axis=1)[:, :k]   # ties at the k-th score: any of them
        hit = (np.sort(got, 1)[:, :, None] == want[:, None, :]).any(2).mean()
        if hit >= _IVF_MIN_RECALL:
            break
        scan *= 2
    _scans.append(min(scan / n, 1.0))
    if scan >= n:
        return _exact_knn(queries, keys, k, bias, np.arange(t) if exclude_self else None)
    out = np.empty((t, k), dtype=np.int64)
    self_ids = np.arange(t, dtype=np.int64) if exclude_self else np.full(t, -1, dtype=np.int64)
    _ivf_scan(queries, cs, kc, ids, off, b, bias is not None, self_ids, int(k), scan, out)
    return out


def _exact_knn(queries, keys, k, bias, self_ids):
    """Exact top-``k`` (the blocked BLAS + fused selection of :func:`knn`); ``self_ids[i]`` is row i's own key."""
    t, n = len(queries), len(keys)
    out = np.empty((t, k), dtype=np.int64)
    b = np.ascontiguousarray(bias) if bias is not None else np.zeros(1, dtype=np.float32)
    for s in range(0, t, _BLOCK):
        scores = np.ascontiguousarray(queries[s:s + _BLOCK] @ keys.T)
        if self_ids is not None:
            scores[np.arange(len(scores)), self_ids[s:s + _BLOCK]] = -np.inf
        select_block(scores, int(k), b, bias is not None, np.int64(0), False, out, np.int64(s))
    return out
