"""Retrieval baselines over one layer's keys: exact top-k, IVF and Quest (NumPy reference).

Every function takes a batch of queries per query head, ``q (Hq, B, d)``, and the keys of the
*indexed* tokens ``keys (Hkv, n, d)`` (the static sink and recent tokens are attended exactly by the
caller and never indexed). Query head ``h`` searches KV head ``h // G``. Results are ids local to the
indexed keys, ``(Hq, B, k)`` int64 sorted by score (best first, ties broken by the lower id), padded
with ``-1`` when fewer than ``k`` keys were scored, and the number of keys whose inner product with
the query was computed, ``n_scanned (Hq, B)``.

* Exact top-k ("Flat" in RetrievalAttention §4): score every key; the ceiling for any retrieval.
* IVF (FAISS ``IndexIVFFlat``; RetrievalAttention §2.4 and §4): k-means lists over the keys, probe the
  ``nprobe`` lists whose centroid has the highest inner product with the query, score their keys.
* Quest (arXiv 2406.10774, §3.2): pages of 16 consecutive keys; per page the element-wise min and
  max of its keys give the upper bound ``sum_j max(q_j min_j, q_j max_j) >= q.k`` for every key
  of the page; the pages with the highest bounds are read.

Scores are plain inner products ``q.k``: the softmax scale does not change the ranking.
"""
from __future__ import annotations

import numpy as np

__all__ = ["select_topk", "exact_topk", "kmeans", "ivf_lists", "ivf_search",
           "quest_metadata", "quest_bounds", "quest_search"]


def select_topk(scores, k):
    """Ids of the ``k`` largest entries of each row of ``scores (R, n)``, best first.

    Ties are broken by the lower id, so the answer is unique and both backends agree on it.
    Returns ``(R, min(k, n))`` int64.
    """
    scores = np.asarray(scores)
    r, n = scores.shape
    k = min(int(k), n)
    out = np.empty((r, k), dtype=np.int64)
    if k == 0:
        return out
    if k < n:
        # the k-th largest value of each row; every id scoring at least that much is a candidate
        kth = np.partition(scores, n - k, axis=1)[:, n - k]                # (R,)
    else:
        kth = scores.min(axis=1)
    for i in range(r):
        cand = np.flatnonzero(scores[i] >= kth[i])                           # ascending ids
        order = np.lexsort((cand, -scores[i, cand].astype(np.float64)))      # score desc, then id asc
        out[i] = cand[order[:k]]
    return out


def exact_topk(q, keys, k):
    """Exact top-k by inner product: every key is scored. Returns ``(ids (Hq, B, k), n_scanned (Hq, B))``."""
    hq, b, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    kk = min(k, n)
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    for h in range(hq):
        scores = q[h] @ keys[h // g].T                                         # (B, n)
        ids[h, :, :kk] = select_topk(scores, kk)
    return ids, np.full((hq, b), n, dtype=np.int64)


# ----------------------------------------------------------------------------------------------- IVF

def kmeans(x, n_clusters, iters=10):
    """Lloyd's k-means (squared Euclidean) on ``x (n, d)``, as FAISS trains an IVF quantizer.

    Initialised deterministically with the points at evenly spaced positions (as RetroInfer's
    clustering), ``iters`` assignment/update rounds; a cluster that empties keeps its old centroid.
    Assignment is blocked, so no ``n x n_clusters`` matrix larger than a block is formed.
    Returns ``(centroids (n_clusters, d) float32, assign (n,) int64)``.
    """
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    c = min(int(n_clusters), n)
    cent = x[np.linspace(0, n - 1, c).astype(np.int64)].copy()                  # (c, d)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(max(1, iters)):
        assign = _nearest_centroid(x, cent)
        sums = np.zeros((c, d), dtype=np.float64)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=c)
        nonempty = counts > 0
        cent[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    return cent, _nearest_centroid(x, cent)


def _nearest_centroid(x, cent, block=4096):
    """argmin_c ||x - c||^2 = argmax_c (x.c - |c|^2 / 2), blocked over the points."""
    half_norm = 0.5 * (cent.astype(np.float64) ** 2).sum(1)                     # (c,)
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), block):
        out[s:s + block] = np.argmax(x[s:s + block] @ cent.T - half_norm, axis=1)
    return out


def ivf_lists(assign, n_clusters):
    """Inverted lists from cluster assignments: ``(ptr (c + 1,), ids (n,))`` with list ``j`` =
    ``ids[ptr[j]:ptr[j + 1]]`` holding its key ids in ascending order (CSR layout)."""
    ids = np.argsort(assign, kind="stable").astype(np.int64)
    ptr = np.zeros(n_clusters + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(assign, minlength=n_clusters))
    return ptr, ids


def ivf_search(q, keys, centroids, ptr, list_ids, nprobe, k):
    """IVF search: probe the ``nprobe`` lists with the highest ``q.centroid``, score their keys.

    ``centroids (Hkv, c, d)``, ``ptr (Hkv, c + 1)``, ``list_ids (Hkv, n)``. ``n_scanned`` counts keys
    only (the ``c`` centroid scores are the same for every query and reported separately).
    """
    hq, b, d = q.shape
    hkv = keys.shape[0]
    g = hq // hkv
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    scanned = np.zeros((hq, b), dtype=np.int64)
    for h in range(hq):
        kv = h // g
        probe = select_topk(q[h] @ centroids[kv].T, nprobe)                    # (B, nprobe)
        for i in range(b):
            cand = np.concatenate([list_ids[kv, ptr[kv, j]:ptr[kv, j + 1]] for j in probe[i]]
                                  + [np.empty(0, np.int64)])
            cand.sort()                                                        # ascending ids: same ties as exact
            scanned[h, i] = len(cand)
            top = select_topk((keys[kv, cand] @ q[h, i])[None], k)[0]
            ids[h, i, :len(top)] = cand[top]
    return ids, scanned


# --------------------------------------------------------------------------------------------- Quest

def quest_metadata(keys, page_size=16):
    """Per page of ``page_size`` consecutive keys, the element-wise min and max: ``(Hkv, P, d)`` each.

    The last page may be shorter. This is all Quest keeps on the GPU besides the static tokens.
    """
    hkv, n, d = keys.shape
    p = -(-n // page_size)
    kmin = np.empty((hkv, p, d), dtype=np.float32)
    kmax = np.empty((hkv, p, d), dtype=np.float32)
    for j in range(p):
        page = keys[:, j * page_size:(j + 1) * page_size]                     # (Hkv, <=page, d)
        kmin[:, j], kmax[:, j] = page.min(axis=1), page.max(axis=1)
    return kmin, kmax


def quest_bounds(q, kmin, kmax):
    """Quest's per-page upper bound ``U_p = sum_j max(q_j min_pj, q_j max_pj)`` (Quest §3.2).

    For every key k of page p, ``q.k <= U_p`` because each term ``q_j k_j`` is at most the larger of
    its values at the ends of ``[min_pj, max_pj]``. ``q (Hq, B, d)`` -> ``(Hq, B, P)`` float32.
    """
    hq, b, d = q.shape
    g = hq // kmin.shape[0]
    out = np.empty((hq, b, kmin.shape[1]), dtype=np.float32)
    for h in range(hq):
        lo = q[h][:, None, :] * kmin[h // g][None]                              # (B, P, d)
        hi = q[h][:, None, :] * kmax[h // g][None]
        out[h] = np.maximum(lo, hi).sum(axis=-1)
    return out


def quest_search(q, keys, kmin, kmax, page_size, n_pages, k):
    """Read the ``n_pages`` pages with the highest bound and rank their keys exactly.

    Returns ``(pages (Hq, B, n_pages), ids (Hq, B, k), n_scanned (Hq, B))``: the selected pages (best
    bound first), the top-k keys among them and the number of keys read.
    """
    hq, b, d = q.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    bounds = quest_bounds(q, kmin, kmax)                                        # (Hq, B, P)
    n_pages = min(n_pages, kmin.shape[1])
    pages = np.empty((hq, b, n_pages), dtype=np.int64)
    ids = np.full((hq, b, k), -1, dtype=np.int64)
    scanned = np.zeros((hq, b), dtype=np.int64)
    for h in range(hq):
        pages[h] = select_topk(bounds[h], n_pages)
        for i in range(b):
            sel = np.sort(pages[h, i])
            cand = np.concatenate([np.arange(p * page_size, min((p + 1) * page_size, n)) for p in sel]
                                  + [np.empty(0, np.int64)]).astype(np.int64)
            scanned[h, i] = len(cand)
            top = select_topk((keys[h // g, cand] @ q[h, i])[None], k)[0]
            ids[h, i, :len(top)] = cand[top]
    return pages, ids, scanned
