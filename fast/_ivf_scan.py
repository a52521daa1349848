"""The IVF scan of the graph build's approximate kNN (fast path only): one fused kernel, parallel over queries.

:func:`ivf_scan` is what :func:`retrokv.fast._ivf_knn._ivf_knn` runs once it has the layout (clusters
of the keys, keys stored cluster by cluster) and every query's cluster scores ``cs``. Per query:

1. **next cluster**: the best cluster not yet scanned, by a vectorised max over the cluster scores left
   (a scanned cluster's score becomes ``-inf``; about 13 picks of 130 clusters at 8K keys);
2. **score** its keys (contiguous float32 dot products) into a scratch row, tracking the score range,
   until ``min_scan`` keys (and ``k`` besides the query's own key) are covered;
3. **select** the exact top ``k`` of the scratch row by a bucket selection (:func:`_top_sorted`), best
   first, ties by the lower id.

Tried and measured slower on this 2-core machine (scratch scripts, 2026-12-04): a cluster-major scan
scoring each cluster's queries with one BLAS ``sgemm`` (scoring alone was ~4x faster, but writing and
re-reading the score blocks made the whole scan 1.25x slower), and a cluster-major Numba loop.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._softmax import max_of

_NBUCKET = 256           # score buckets of the per-query selection


@nb.njit(cache=True)
def _top_sorted(sv, si, m, k, lo, hi, hist, bk, tv, ti, out_row):
    """The best ``k`` of the ``m`` candidates ``(sv, si)``, best first (score desc, id asc), into ``out_row``.

    ``lo``, ``hi``: the least and the greatest score above ``-inf`` (``lo = inf`` when there is none).
    Bucket select: scores are binned linearly between ``lo`` and ``hi`` (a monotone map, so every
    candidate scoring at least the k-th best lands in its bucket or above; ``-inf`` in bucket 0), the
    histogram gives the k-th best's bucket, and the candidates from that bucket up (about ``k``) are
    scattered into ``(tv, ti)`` best bucket first (a counting sort), so that the closing insertion sort
    is near-linear. The bucket indices are computed once, in a loop LLVM vectorises, into ``bk``. When
    the range is not finite (a dot product overflowed to ``inf``) every candidate goes to bucket 0: the
    selection stays exact, only slower. A heap updated per key, or a quickselect, cost more (measured).
    """
    scale = (_NBUCKET - 1) / (hi - lo) if hi > lo else 0.0
    if 0.0 < scale < np.inf:
        for j in range(m):
            x = (np.float64(sv[j]) - lo) * scale
            x = x if x > 0.0 else 0.0            # -inf and NaN: bucket 0
            x = x if x < _NBUCKET - 1.0 else _NBUCKET - 1.0
            bk[j] = np.uint8(x)
    else:
        bk[:m] = 0
    hist[:] = 0
    for j in range(m):
        hist[bk[j]] += 1
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
        b = bk[j]
        if b >= cut:
            p = hist[b]
            tv[p], ti[p] = sv[j], si[j]
            hist[b] = p + 1
    for x in range(1, c):                                 # insertion sort: score desc, id asc
        v, w = tv[x], ti[x]
        y = x
        while y > 0 and (tv[y - 1] < v or (tv[y - 1] == v and ti[y - 1] > w)):
            tv[y], ti[y] = tv[y - 1], ti[y - 1]
            y -= 1
        tv[y], ti[y] = v, w
    for r in range(k):
        out_row[r] = ti[r]


@nb.njit(cache=True)
def _next_cluster(row, taken):
    """Step 1: the best cluster of ``row`` not ``taken`` (ties: the lower id), marked taken (its score
    set to ``-inf``); clusters scoring ``-inf`` or NaN come last, in id order; ``-1`` when none is left."""
    best = max_of(row)
    bc = -1
    if best > -np.inf:                          # never a taken cluster: those score -inf
        for r in range(row.shape[0]):
            if row[r] == best:
                bc = r
                break
    if bc < 0:
        for r in range(row.shape[0]):
            if not taken[r]:
                bc = r
                break
    if bc >= 0:
        taken[bc] = True
        row[bc] = -np.inf
    return bc


@nb.njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "nsz"})
def ivf_scan(queries, cs, kc, ids, off, bias, use_bias, self_ids, k, min_scan, out):
    """Row ``i`` of ``out (t, k)``: the best ``k`` keys (ids, best first, ties by the lower id) among those
    of query ``i``'s best clusters by ``cs (t, C)``, scanned best first until ``min_scan`` keys and ``k``
    keys other than its own are covered.

    ``kc (n, d)``: the keys cluster by cluster, ``ids (n,)`` their ids, ``off (C+1,)`` the cluster
    boundaries. Scores are ``q.k`` plus ``bias[id]`` when ``use_bias``; row ``i`` never returns key
    ``self_ids[i]`` (``-1``: no exclusion). ``fastmath`` lets LLVM vectorise the float32 dot (the sum
    order differs from BLAS: near-ties may swap with the reference's); only reassociation, so
    infinities keep their meaning.
    """
    t, d = queries.shape
    c = cs.shape[1]
    n = kc.shape[0]
    nchunk = min(t, 64)
    per = (t + nchunk - 1) // nchunk
    for ch in nb.prange(nchunk):
        row = np.empty(c, dtype=np.float32)
        taken = np.empty(c, dtype=np.bool_)
        sv = np.empty(n, dtype=np.float32)
        si = np.empty(n, dtype=np.int64)
        hist = np.empty(_NBUCKET, dtype=np.int64)
        bk = np.empty(n, dtype=np.uint8)
        tv = np.empty(n, dtype=np.float32)
        ti = np.empty(n, dtype=np.int64)
        for i in range(ch * per, min(t, (ch + 1) * per)):
            row[:] = cs[i]
            taken[:] = False
            m = 0
            got = 0
            lo, hi = np.inf, -np.inf                      # float64, as the bucket arithmetic (no overflow)
            while got < min_scan or m < k:
                bc = _next_cluster(row, taken)            # 1. the next cluster
                if bc < 0:
                    break
                got += off[bc + 1] - off[bc]
                for j in range(off[bc], off[bc + 1]):     # 2. score its keys
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
            _top_sorted(sv, si, m, min(k, m), lo, hi, hist, bk, tv, ti, out[i])      # 3. select
