"""Exact top-k selection for the fast path: the same ids as ``reference.baselines.select_topk``, ties included.

Every id scoring at least a threshold ``t`` (any ``t`` no larger than the k-th largest score gives the
same top k) is a candidate, in ascending id order; a stable sort by score then breaks ties by the lower
id, as the reference does. A sampled ``t`` (about ``2k`` entries pass) keeps the candidates few and
skips the full partition of the row; the exact partition is the fallback when the sample was unlucky.
Used by :func:`retrokv.fast.baselines.select_topk` and by the graph build's fused kNN
(:func:`retrokv.fast.graph_index.knn`, which adds a bias and excludes each key from its own list).
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True)
def _kth_sample(row, n, k):
    """A value ``t`` with, very likely, at least ``k`` entries of ``row[:n]`` at or above it (see below).

    Every ``step``-th entry (about ``4k`` of them) and the value ranked ``ceil(2k / step)`` among
    them, found with a small sorted buffer (no allocation of the sample, no partition). About ``2k``
    entries are expected to pass; the caller counts them and falls back to the exact k-th largest
    when fewer than ``k`` do. ``+inf`` when the row is too short for sampling to pay off.
    """
    step = n // (4 * k)
    if step < 2:
        return np.inf
    m = (n + step - 1) // step
    j = min(m, (2 * k + step - 1) // step)
    buf = np.empty(j, dtype=row.dtype)                 # the j largest sampled values, descending
    cnt = 0
    for t in range(m):
        v = row[t * step]
        if cnt == j:
            if not v > buf[j - 1]:
                continue
            pos = j - 1
        else:
            pos = cnt
            cnt += 1
        while pos > 0 and buf[pos - 1] < v:
            buf[pos] = buf[pos - 1]
            pos -= 1
        buf[pos] = v
    return buf[j - 1]


@nb.njit(cache=True)
def _at_least(row, n, t, cand):
    """Ids ``j`` (ascending) with ``row[j] >= t`` into ``cand``; returns their count.

    Few entries pass, so blocks of 16 are first tested by their maximum (a loop LLVM vectorises)
    and only blocks holding a passing entry are scanned one by one.
    """
    c = 0
    nb16 = n - n % 16
    for a in range(0, nb16, 16):
        mx = row[a]
        for j in range(a + 1, a + 16):
            mx = max(mx, row[j])
        if mx >= t:
            for j in range(a, a + 16):
                if row[j] >= t:
                    cand[c] = j
                    c += 1
    for j in range(nb16, n):
        if row[j] >= t:
            cand[c] = j
            c += 1
    return c


@nb.njit(cache=True)
def _sort_desc(vals, ids, c, tmpv, tmpi):
    """Stable sort of ``vals[:c]`` descending, ``ids`` alongside (ties keep their order: ids ascending).

    Insertion sort of runs of 32, then bottom-up merges through the scratch ``tmpv``/``tmpi``; the
    same order as ``np.argsort(-vals, kind="stable")`` without its allocations.
    """
    run = 32
    for a in range(0, c, run):
        b = min(a + run, c)
        for x in range(a + 1, b):
            v, w = vals[x], ids[x]
            y = x
            while y > a and vals[y - 1] < v:
                vals[y] = vals[y - 1]
                ids[y] = ids[y - 1]
                y -= 1
            vals[y] = v
            ids[y] = w
    width = run
    while width < c:
        for a in range(0, c, 2 * width):
            mid = min(a + width, c)
            b = min(a + 2 * width, c)
            x, y, o = a, mid, a
            while x < mid and y < b:
                if vals[y] > vals[x]:                  # strictly greater: equal values keep the left one first
                    tmpv[o] = vals[y]
                    tmpi[o] = ids[y]
                    y += 1
                else:
                    tmpv[o] = vals[x]
                    tmpi[o] = ids[x]
                    x += 1
                o += 1
            while x < mid:
                tmpv[o] = vals[x]
                tmpi[o] = ids[x]
                x += 1
                o += 1
            while y < b:
                tmpv[o] = vals[y]
                tmpi[o] = ids[y]
                y += 1
                o += 1
        for j in range(c):
            vals[j] = tmpv[j]
            ids[j] = tmpi[j]
        width *= 2


@nb.njit(parallel=True, cache=True)
def select_block(scores, k, bias, use_bias, self0, exclude_self, out, o0):
    """Top-``k`` ids of every row of ``scores (+ bias)`` into ``out[o0 + i]``: the reference's answer.

    Fuses the reference :func:`~retrokv.reference.graph_index.knn`'s ``scores += bias`` (same
    float32 additions) and self exclusion (row ``i`` is key ``self0 + i``, set to ``-inf``) into the
    selection of :func:`retrokv.fast.baselines.select_topk` (candidates at or above a sampled
    threshold ``t <= k``-th largest, in ascending id order, then a stable sort by score: ties by id).
    Parallel over chunks of rows; each chunk reuses its scratch rows (no per-row ``(n,)`` allocation).
    """
    r, n = scores.shape
    nchunk = min(r, 64)
    per = (r + nchunk - 1) // nchunk
    for ch in nb.prange(nchunk):
        row = np.empty(n, dtype=scores.dtype)
        cand = np.empty(n, dtype=np.int64)
        vals = np.empty(n, dtype=scores.dtype)
        tmpv = np.empty(n, dtype=scores.dtype)
        tmpi = np.empty(n, dtype=np.int64)
        for i in range(ch * per, min(r, (ch + 1) * per)):
            if use_bias:
                for j in range(n):
                    row[j] = scores[i, j] + bias[j]
            else:
                for j in range(n):
                    row[j] = scores[i, j]
            if exclude_self and 0 <= self0 + i < n:
                row[self0 + i] = -np.inf
            c = 0
            if k < n:
                t = _kth_sample(row, n, k)
                c = _at_least(row, n, t, cand)
                if c < k:                             # the sample was unlucky (or not taken): exact
                    t = np.partition(row.copy(), n - k)[n - k]
                    c = 0
                    for j in range(n):
                        if row[j] >= t:
                            cand[c] = j
                            c += 1
            else:
                for j in range(n):
                    cand[j] = j
                c = n
            for j in range(c):
                vals[j] = row[cand[j]]
            _sort_desc(vals, cand, c, tmpv, tmpi)
            for j in range(k):
                out[o0 + i, j] = cand[j]
