"""Retrieval baselines, fast path: Numba twins of ``reference/baselines.py`` (same names, same results).

The hot parts run in Numba: top-k selection (one streaming pass per row with a fixed-size sorted
buffer, parallel over rows), the IVF list scan and the Quest page bounds and page scan (parallel over
(query head, query) pairs). Score matrices that are plain matmuls (exact top-k, centroid scores) stay
on BLAS. The build steps that are not hot, k-means (BLAS-bound), the inverted lists and the Quest
page metadata, are imported from :mod:`retrokv.reference.baselines` unchanged.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ..reference.baselines import ivf_lists, kmeans, quest_metadata  # build steps, not hot
from ._dispatch import require_numpy
from ._topk import select_block

__all__ = ["select_topk", "exact_topk", "kmeans", "ivf_lists", "ivf_search",
           "quest_metadata", "quest_bounds", "quest_search"]


@nb.njit(cache=True, inline="always")
def _push(best_s, best_i, cnt, s, idx):
    """Insert (s, idx) into the buffer sorted by (score desc, id asc); returns the new count."""
    k = best_s.shape[0]
    if cnt == k:
        ws, wi = best_s[k - 1], best_i[k - 1]
        if not (s > ws or (s == ws and idx < wi)):
            return cnt
        pos = k - 1
    else:
        pos = cnt
        cnt += 1
    while pos > 0 and (best_s[pos - 1] < s or (best_s[pos - 1] == s and best_i[pos - 1] > idx)):
        best_s[pos] = best_s[pos - 1]
        best_i[pos] = best_i[pos - 1]
        pos -= 1
    best_s[pos] = s
    best_i[pos] = idx
    return cnt


def select_topk(scores, k):
    """Same contract as :func:`retrokv.reference.baselines.select_topk`; one Numba pass per row."""
    require_numpy("select_topk", scores)
    scores = np.ascontiguousarray(scores)
    k = min(int(k), scores.shape[1])
    if k == 0:
        return np.empty((scores.shape[0], 0), dtype=np.int64)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    select_block(scores, k, np.zeros(1, dtype=scores.dtype), False, 0, False, out, 0)
    return out


def exact_topk(q, keys, k):
    """Same contract as :func:`retrokv.reference.baselines.exact_topk`; scores by BLAS, selection in Numba."""
    require_numpy("exact_topk", q, keys)
    hq, b, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    kk = min(k, n)
    if kk:
        # one matmul per KV head serves its G query heads: (G*B, d) @ (d, n)
        scores = np.stack([(q[kv * g:(kv + 1) * g].reshape(g * b, d) @ keys[kv].T) for kv in range(hkv)])
        ids[:, :, :kk] = select_topk(scores.reshape(hq * b, n), kk).reshape(hq, b, kk)
    return ids, np.full((hq, b), n, dtype=np.int64)


@nb.njit(parallel=True, cache=True)
def _scan_lists(q, keys, probe, ptr, list_ids, k, g):
    """Score the keys of the probed lists of every (head, query) pair, keep the top k."""
    hq, b, d = q.shape
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    scanned = np.zeros((hq, b), dtype=np.int64)
    for item in nb.prange(hq * b):
        h, i = item // b, item % b
        kv = h // g
        best_s = np.empty(k, dtype=np.float32)
        best_i = np.empty(k, dtype=np.int64)
        cnt = 0
        for p in range(probe.shape[2]):
            lst = probe[h, i, p]
            for t in range(ptr[kv, lst], ptr[kv, lst + 1]):
                j = list_ids[kv, t]
                s = np.float32(0.0)
                for x in range(d):
                    s += q[h, i, x] * keys[kv, j, x]
                cnt = _push(best_s, best_i, cnt, s, j)
                scanned[h, i] += 1
        for t in range(cnt):
            ids[h, i, t] = best_i[t]
    return ids, scanned


def ivf_search(q, keys, centroids, ptr, list_ids, nprobe, k):
    """Same contract as :func:`retrokv.reference.baselines.ivf_search`; the list scan runs in Numba."""
    require_numpy("ivf_search", q, keys, centroids)
    hq, b, d = q.shape
    hkv, c = centroids.shape[:2]
    g = hq // hkv
    nprobe = min(int(nprobe), c)
    cscores = np.stack([q[h] @ centroids[h // g].T for h in range(hq)])        # (Hq, B, c)
    probe = select_topk(cscores.reshape(hq * b, c), nprobe).reshape(hq, b, nprobe)
    return _scan_lists(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.float32),
                       probe, np.ascontiguousarray(ptr, dtype=np.int64),
                       np.ascontiguousarray(list_ids, dtype=np.int64), int(k), g)


@nb.njit(parallel=True, cache=True)
def _bounds(q, kmin, kmax, g):
    hq, b, d = q.shape
    p = kmin.shape[1]
    out = np.empty((hq, b, p), dtype=np.float32)
    for item in nb.prange(hq * b):
        h, i = item // b, item % b
        kv = h // g
        for j in range(p):
            s = np.float32(0.0)
            for x in range(d):
                s += max(q[h, i, x] * kmin[kv, j, x], q[h, i, x] * kmax[kv, j, x])
            out[h, i, j] = s
    return out


def quest_bounds(q, kmin, kmax):
    """Same contract as :func:`retrokv.reference.baselines.quest_bounds`; Numba, parallel over queries."""
    require_numpy("quest_bounds", q, kmin, kmax)
    g = q.shape[0] // kmin.shape[0]
    return _bounds(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(kmin, dtype=np.float32),
                   np.ascontiguousarray(kmax, dtype=np.float32), g)


def quest_search(q, keys, kmin, kmax, page_size, n_pages, k):
    """Same contract as :func:`retrokv.reference.baselines.quest_search`; pages scanned as IVF lists."""
    require_numpy("quest_search", q, keys, kmin, kmax)
    hq, b, d = q.shape
    hkv, n, _ = keys.shape
    n_p = kmin.shape[1]
    bounds = quest_bounds(q, kmin, kmax)                                        # (Hq, B, P)
    n_pages = min(int(n_pages), n_p)
    pages = select_topk(bounds.reshape(hq * b, n_p), n_pages).reshape(hq, b, n_pages)
    # a page is an inverted list of consecutive ids: reuse the IVF scan
    ptr = np.tile(np.minimum(np.arange(n_p + 1, dtype=np.int64) * page_size, n), (hkv, 1))
    lst = np.tile(np.arange(n, dtype=np.int64), (hkv, 1))
    ids, scanned = _scan_lists(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.float32),
                               pages, ptr, lst, int(k), hq // hkv)
    return pages, ids, scanned
