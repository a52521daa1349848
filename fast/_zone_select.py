"""Zone selection kernels of the fast wave index (:func:`retrokv.fast.wave_index.select_zones` and its fused
decode step): the reference's stable-sort zones without sorting every cluster.

The cut is a radix select on the float bits (linear time, predictable branches), the cut's ties go to the
lower cluster ids as in the reference's stable sort, and only the retrieved clusters are sorted; the
estimation zone is returned in id order (the reference's contract, ``reference/wave_index.py``).
"""
from __future__ import annotations

import numba as nb
import numpy as np

@nb.njit(cache=True)
def _kth_smallest(x, k):
    """The ``k``-th smallest (1-based) of the float32 ``x`` (no NaN): a radix select, 8 bits per pass, on
    the float bits mapped to unsigned integers that sort like the floats (ties of -0.0 and +0.0 aside,
    which compare equal anyway). Linear time with predictable branches, unlike a quickselect."""
    n = x.shape[0]
    u = np.empty(n, dtype=np.uint32)
    bits = x.view(np.uint32)
    for i in range(n):
        b = bits[i]
        u[i] = ~b if b >> np.uint32(31) else b | np.uint32(0x80000000)
    prefix, mask = np.uint32(0), np.uint32(0)
    hist = np.empty(256, dtype=np.int64)
    for shift in (24, 16, 8, 0):
        hist[:] = 0
        for i in range(n):
            if u[i] & mask == prefix:
                hist[(u[i] >> np.uint32(shift)) & np.uint32(255)] += 1
        b = 0
        while k > hist[b]:                           # the bucket holding the k-th of those left
            k -= hist[b]
            b += 1
        prefix |= np.uint32(b) << np.uint32(shift)
        mask |= np.uint32(255) << np.uint32(shift)
    out = np.empty(1, dtype=np.uint32)
    out[0] = prefix & np.uint32(0x7FFFFFFF) if prefix >> np.uint32(31) else ~prefix
    return out.view(np.float32)[0]


@nb.njit(cache=True)
def _top_ids(neg, top, cand):
    """The ``top`` smallest of ``neg`` into ``cand``, in id order, ties at the cut to the lower ids."""
    cut = _kth_smallest(np.ascontiguousarray(neg), top)   # linear time: the worst value that is selected
    ties = top
    for i in range(neg.shape[0]):
        ties -= neg[i] < cut                          # the cut's ties fill what the strictly better leave
    j = 0
    for i in range(neg.shape[0]):                     # in id order, so the lowest ids win the tie at the cut
        if neg[i] < cut or (neg[i] == cut and ties > 0):
            ties -= neg[i] == cut
            cand[j] = i
            j += 1


@nb.njit(cache=True)
def _select_head(row, top, nr, best):
    """The reference's zones of one KV head into ``best (top,)``: the ``nr`` best ids in the stable sort's
    order (rank descending, ties to the lower id), then the other ``top - nr`` of the top in id order.
    Two linear-time selections and a sort of the ``nr`` retrieved only. ``0 < top <= len(row)``, float32, no NaN."""
    cand = np.empty(top, dtype=np.int64)
    _top_ids(-row, top, cand)                         # the top clusters, in id order
    keys = np.empty(top, dtype=row.dtype)
    for j in range(top):
        keys[j] = -row[cand[j]]
    inner = np.empty(nr, dtype=np.int64)
    if nr > 0:
        _top_ids(keys, nr, inner)                     # positions in cand of the nr best, in id order
    retrieved = np.zeros(top, dtype=np.bool_)
    rk = np.empty(nr, dtype=row.dtype)
    for j in range(nr):
        retrieved[inner[j]] = True
        rk[j] = keys[inner[j]]
    order = np.argsort(rk, kind="mergesort")          # stable: equal ranks keep id order
    for j in range(nr):
        best[j] = cand[inner[order[j]]]
    j = nr
    for x in range(top):                              # the estimation zone: the rest, in id order
        if not retrieved[x]:
            best[j] = cand[x]
            j += 1


@nb.njit(parallel=True, cache=True)
def _select(rank, top, nr):
    hkv = rank.shape[0]
    best = np.empty((hkv, top), dtype=np.int64)
    for h in nb.prange(hkv):
        _select_head(rank[h], top, nr, best[h])
    return best
