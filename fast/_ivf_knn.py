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
from ._ivf_scan import ivf_scan as _ivf_scan
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


@nb.njit(parallel=True, cache=True)
def _assign(scores, half, assign):
    """``assign[i] = argmax_r scores[i, r] - half[r]`` (the first of equal maxima, as ``np.argmax``)."""
    n, c = scores.shape
    for i in nb.prange(n):
        best, bi = scores[i, 0] - half[0], 0
        for r in range(1, c):
            v = scores[i, r] - half[r]
            if v > best:
                best, bi = v, r
        assign[i] = bi


@nb.njit(cache=True)
def _update(keys, assign, cent):
    """Each non-empty cluster's centroid becomes the float64 mean of its keys (summed in key order)."""
    n, d = keys.shape
    c = cent.shape[0]
    sums = np.zeros((c, d), dtype=np.float64)
    counts = np.zeros(c, dtype=np.int64)
    for i in range(n):
        b = assign[i]
        counts[b] += 1
        for x in range(d):
            sums[b, x] += keys[i, x]
    for b in range(c):
        if counts[b] > 0:
            for x in range(d):
                cent[b, x] = np.float32(sums[b, x] / counts[b])


def _kmeans(keys, c):
    """Euclidean k-means of ``keys (n, d)`` into ``c`` clusters: ``(centroids, assign)``, deterministic.

    Seeds: ``c`` keys drawn with a fixed seed; assignment by ``argmax k.c - |c|^2 / 2`` (one BLAS call,
    then :func:`_assign`); an emptied cluster keeps its centroid (:func:`_update`).
    """
    n = len(keys)
    cent = keys[np.sort(np.random.default_rng(0).choice(n, c, replace=False))].astype(np.float32)
    assign = np.empty(n, dtype=np.int64)
    for it in range(_IVF_ITERS + 1):
        half = (0.5 * (cent.astype(np.float64) ** 2).sum(1)).astype(np.float32)
        _assign(keys @ cent.T, half, assign)
        if it == _IVF_ITERS:
            break
        _update(keys, assign, cent)
    return cent, assign


def _layout(keys):
    """IVF layout of ``keys``: ``(centroids (C, d), half |c|^2 (C,), keys by cluster, their ids, offsets (C+1,))``.

    About ``1.5 sqrt(n)`` clusters (~60 keys each at n = 8K). Cached for the last keys seen (by
    content), so the key kNN and every query head of a GQA group share one k-means.
    """
    import hashlib

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    tag = (keys.shape, hashlib.sha256(keys.view(np.uint8)).digest())   # SHA extensions: ~2x blake2b here
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
        kth = np.partition(exact, n - k, axis=1)[:, n - k]      # each row's k-th best exact score
        hit = (np.take_along_axis(exact, got, 1) >= kth[:, None]).mean()   # a tie at the k-th counts as a hit
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
