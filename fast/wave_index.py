"""RetroInfer's wave index, fast path: same names and results as ``reference/wave_index.py``.

One decode step touches a small fraction of the KV cache, so every stage is written to read as
little memory as possible, once:

* centroid scoring: a matmul-like kernel over the contiguous ``(Hkv, C, d)`` centroid array, the
  G query heads of a group sharing each centroid load; empty clusters get ``-inf``;
* ranking: softmax per query head summed over the group (or the group's best score, ``group_rank="max_logit"``),
  then partitions (linear time) instead of a
  full sort; only the retrieved clusters are sorted, to keep their rank order (the estimation zone is a
  set, kept in id order);
* retrieval: the clusters are contiguous ranges of the cluster-sorted KV copy, so the exact
  attention reads ``[steady | retrieved]`` where it lies (:func:`attend_retrieved`: no execution-buffer
  copy, which at 128K tokens would read and write the retrieved KV once more), one kernel for every
  KV head, the G heads of a group sharing each key and value load. With a wave buffer the same
  kernel runs over the buffer it fills (:func:`attend_execution_buffer`);
* estimation: one weighted pass over the chosen centroid scores and value sums (the size weights
  only the denominator), producing an ``(out, lse)`` partial merged by :func:`merge_partials`.

A decode step is small: below :data:`~retrokv.fast._dispatch.PARALLEL_MIN_WORK` multiply-adds its
kernels run on one thread (:func:`~retrokv.fast._dispatch.threads_for`), so that a busy core never
stalls a step at a barrier; below :data:`FUSED_MAX_WORK`, or with more KV heads than threads, the
driver's steps run as one kernel (:func:`_decode_step`) built from the per-head kernels the composed
path runs in parallel loops, so the two paths give the same bits.

Building the index (``build_meta_index``, ``concat_meta``: clustering, the cluster-sorted KV copy, the
metadata on transparent huge pages) is in :mod:`retrokv.fast._wave_build`, and the exact zone's kernels
(``gather_execution_buffer``, ``attend_retrieved``, ``attend_execution_buffer``) in
:mod:`retrokv.fast._wave_exact`; both are re-exported here. The
small bookkeeping helpers (``empty_meta``, ``estimation_as_pseudo_tokens``, ``Workspace``) are not hot
and are imported from the reference, and so is the driver: ``tripartite_attention`` is the
reference's, run with this module's kernels.
"""
from __future__ import annotations

import math
import sys

import numba as nb
import numpy as np

from retrokv.reference import wave_index as _ref
from retrokv.reference.wave_index import (GROUP_RANKS, ExecBuffer, MetaIndex, Workspace, Zones,  # not hot
                                          cluster_radii, empty_meta, estimation_as_pseudo_tokens)

from . import _dispatch
from ._dispatch import any_cupy, cuda, require_numpy, threads_for
from ._prefetch import prefetch_rows
from ._softmax import exp_shifted, max_of, max_or_nan
from ._wave_exact import (_FLAGS, _attend_head, attend_execution_buffer, attend_retrieved,  # the exact zone
                          gather_execution_buffer)
from ._wave_build import build_meta_index, concat_meta
from ._zone_select import _select, _select_head
from .attention import _merge_pair, merge_partials

__all__ = ["GROUP_RANKS", "cluster_radii", "MetaIndex", "ExecBuffer", "Zones", "Workspace", "empty_meta",
           "build_meta_index", "concat_meta", "rank_clusters", "select_zones", "gather_execution_buffer", "attend_execution_buffer",
           "attend_retrieved", "estimate_partial", "estimation_as_pseudo_tokens", "tripartite_attention"]

_CHUNK = 256                                      # centroids per work item
_AHEAD = 8                                        # estimated clusters' value sums prefetched ahead
# a step with less work (query heads x d x (clusters + steady tokens)) runs as one kernel, _decode_step,
# and so does a larger one with more KV heads than threads (its parallel loop is over the KV heads). With
# fewer KV heads than threads (e.g. one, MQA) a large step runs as the composed kernels, whose parallel
# loops split the clusters. Measured at 128K tokens on 2 threads (Hkv=8, G=4, d=128): fused 6.4 ms,
# composed 7.0-8.0 ms; Hkv=3: 2.4-2.8 vs 2.6-4.5 ms; Hkv=1: 2.1-2.5 vs 2.0-2.4 ms (docs/benchmarks.md).
FUSED_MAX_WORK = 1 << 22


def _fused(work, hkv):
    """Whether a step of ``work`` multiply-adds over ``hkv`` KV heads runs as :func:`_decode_step` (inside
    :func:`~retrokv.fast._dispatch.threads_for`, which sets the thread count first)."""
    return work < FUSED_MAX_WORK or hkv > nb.get_num_threads()


@nb.njit(cache=True, fastmath=_FLAGS)
def _score_centroids(qb, cent, sizes, scale, h, i0, i1, scores):
    """Scores of head ``h``'s centroids ``i0:i1`` for its G query heads; empty clusters get ``-inf``."""
    g, d = qb.shape[1], qb.shape[2]
    for i in range(i0, i1):
        if sizes[h, i] == 0:
            for r in range(g):
                scores[h, r, i] = -np.inf
            continue
        for r in range(g):          # the centroid row stays in L1 while the G heads read it
            acc = np.float32(0.0)
            for x in range(d):      # contiguous dot product: vectorised
                acc += qb[h, r, x] * cent[h, i, x]
            scores[h, r, i] = acc * scale


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def _centroid_scores(qb, cent, sizes, scale):
    hkv, g, d = qb.shape
    c = cent.shape[1]
    scores = np.empty((hkv, g, c), dtype=np.float32)
    n_chunks = (c + _CHUNK - 1) // _CHUNK
    for item in nb.prange(hkv * n_chunks):
        h = item // n_chunks
        c0 = (item % n_chunks) * _CHUNK
        _score_centroids(qb, cent, sizes, scale, h, c0, min(c0 + _CHUNK, c), scores)
    return scores


@nb.njit(cache=True, fastmath=_FLAGS)
def _rank_head(scores, h, p, rank):
    """``rank[h]``: the softmax of each of head ``h``'s G query heads (``p (G, C)`` scratch), summed over the group."""
    g, c = p.shape
    scratch = np.empty(2 * c, dtype=np.float32)
    for r in range(g):
        m = max_or_nan(scores[h, r])                # NaN: the row's softmax is NaN, as the reference's
        if m == -np.inf:                            # every cluster empty: nothing to rank
            for i in range(c):
                p[r, i] = 0.0
            continue
        exp_shifted(scores[h, r], m, p[r], scratch)
        z = np.float32(0.0)
        for i in range(c):
            z += p[r, i]
        inv = np.float32(1.0) / z
        for i in range(c):
            p[r, i] *= inv
    for i in range(c):
        rank[h, i] = 0.0
    for r in range(g):                              # summed over the GQA group, heads in order
        for i in range(c):
            rank[h, i] += p[r, i]


@nb.njit(cache=True, fastmath=_FLAGS)
def _max_logit_head(scores, h, rank):
    """``rank[h, i]``: the largest score of cluster ``i`` over head ``h``'s G query heads
    (``group_rank="max_logit"``; a NaN score makes its cluster's rank NaN, as the reference's ``max``)."""
    g, c = scores.shape[1], scores.shape[2]
    for i in range(c):
        b = scores[h, 0, i]
        for r in range(1, g):
            x = scores[h, r, i]
            if x > b or x != x:                     # a NaN wins: it must reach the rank
                b = x
        rank[h, i] = b


@nb.njit(cache=True, fastmath=_FLAGS)
def _group_rank_head(scores, h, max_logit, rank):
    """Head ``h``'s ranking: :func:`_max_logit_head` when ``max_logit``, else :func:`_rank_head`."""
    g, c = scores.shape[1], scores.shape[2]
    if max_logit:
        _max_logit_head(scores, h, rank)
    else:
        _rank_head(scores, h, np.empty((g, c), dtype=np.float32), rank)


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def _gqa_rank(scores, max_logit):
    hkv, g, c = scores.shape
    rank = np.zeros((hkv, c), dtype=np.float32)
    for h in nb.prange(hkv):
        _group_rank_head(scores, h, max_logit, rank)
    return rank


def rank_clusters(q, centroids, sizes, scale, group_rank="softmax_sum", radii=None, radius_weight=0.0, n_plain=0):
    """Same contract as :func:`retrokv.reference.wave_index.rank_clusters`; Numba kernels (CUDA for CuPy input).
    The ball bound (``radius_weight``) is one NumPy expression over the scores: it is ranked, not returned;
    a mixed ranking (``n_plain``) takes the plain ranking's best with :func:`select_zones`."""
    _ref.check_group_rank(group_rank)
    _ref.check_radii(radii, radius_weight, centroids.shape[:2])
    n_plain = _ref.check_n_plain(n_plain, radius_weight)
    if any_cupy(q, centroids):
        return cuda("wave_index").rank_clusters(q, centroids, sizes, scale, group_rank, radii, radius_weight,
                                                n_plain)
    hkv, c, d = centroids.shape
    qb = np.ascontiguousarray(q.reshape(hkv, -1, d), dtype=np.float32)   # (Hkv, G, d)
    scores = _centroid_scores(qb, centroids, sizes, np.float32(scale))    # (Hkv, G, C)
    by = _ref.ball_bound(scores, qb, radii, radius_weight, scale) if radius_weight else scores
    rank = _gqa_rank(by, group_rank == "max_logit")
    if n_plain and c:
        rank = _ref.lead_with(rank, select_zones(_gqa_rank(scores, group_rank == "max_logit"), n_plain, 0)[0])
    return scores, rank


def select_zones(rank, n_retrieve, n_estimate):
    """Same contract as the reference: the top ``n_retrieve + n_estimate`` by a partition (linear time),
    the retrieved among them by a second one, and only those sorted, in one kernel (a decode step's many
    small NumPy calls cost more than the work; the estimation zone comes in id order, unsorted).

    A partition alone picks an arbitrary member of a tie at the cut, where the reference's stable sort
    takes the lowest cluster ids (ties are common: every empty cluster ranks 0, a repeated context has
    equal centroids); the kernel fills the cut's ties in id order instead. Ranks with a NaN take the
    reference's stable sort, and so do ranks that are not float32."""
    if any_cupy(rank):
        return cuda("wave_index").select_zones(rank, n_retrieve, n_estimate)
    hkv, c = rank.shape
    top = min(c, n_retrieve + n_estimate)
    if top == 0:
        return np.zeros((hkv, 0), np.int64), np.zeros((hkv, 0), np.int64)
    if rank.dtype != np.float32 or np.isnan(rank).any():    # the radix select reads float32 bits
        return _ref.select_zones(rank, n_retrieve, n_estimate)
    best = _select(np.ascontiguousarray(rank), top, min(n_retrieve, top))
    return best[:, :n_retrieve], best[:, n_retrieve:top]


@nb.njit(cache=True, inline="always", fastmath=_FLAGS)
def _estimate_weights(scores, h, r, est, w, scratch):
    """``w[j] = exp(score of est[j] - m)`` for query head ``r`` of KV head ``h``; returns ``m``, the max
    score (``-inf``: only empty clusters, ``w`` then unset)."""
    for j in range(len(est)):
        w[j] = scores[h, r, est[j]]
    m = max_of(w)                                     # a NaN weight makes den NaN below: no estimate
    if m != -np.inf:
        exp_shifted(w, m, w, scratch)
    return m


@nb.njit(cache=True, inline="always", fastmath=_FLAGS)
def _estimate_finish(acc, den, m, h, r, out, lse):
    if den > 0:
        for x in range(out.shape[2]):
            out[h, r, x] = acc[x] / den
        lse[h, r] = m + np.float32(math.log(den))


@nb.njit(cache=True, inline="always")
def _prefetch_value_sums(value_sums, h, est, j):
    """Prefetch the value-sum row of head ``h``'s ``j``-th estimated cluster (nothing past the last): the
    rows are scattered, so they are asked for :data:`_AHEAD` clusters before they are read."""
    if j < len(est):
        prefetch_rows(value_sums, h, est[j], est[j] + 1)


@nb.njit(cache=True, fastmath=_FLAGS)
def _estimate_heads(scores, sizes, value_sums, h, est, r0, r1, out, lse):
    """Eq. 2's estimate for query heads ``r0:r1`` of KV head ``h`` over the estimation clusters ``est``.
    Each value-sum row is read once for all of them; each head's arithmetic is the same, in the same
    order, whichever heads share the call (the fused step passes the whole group, the composed kernel
    one head per work item: the same bits)."""
    g, dv = r1 - r0, value_sums.shape[2]
    w = np.empty((g, len(est)), dtype=np.float32)
    m = np.empty(g, dtype=np.float32)
    scratch = np.empty(2 * len(est), dtype=np.float32)
    for r in range(g):
        m[r] = _estimate_weights(scores, h, r0 + r, est, w[r], scratch)
    den = np.zeros(g, dtype=np.float32)
    acc = np.zeros((g, dv), dtype=np.float32)
    for j in range(_AHEAD):
        _prefetch_value_sums(value_sums, h, est, j)
    for j in range(len(est)):
        _prefetch_value_sums(value_sums, h, est, j + _AHEAD)
        i = est[j]
        if sizes[h, i] == 0:
            continue
        for r in range(g):
            if m[r] == -np.inf:                       # only empty clusters: no estimate
                continue
            den[r] += w[r, j] * np.float32(sizes[h, i])     # the size weights the denominator only
            for x in range(dv):                             # numerator: exp(score) * value sum
                acc[r, x] += w[r, j] * value_sums[h, i, x]
    for r in range(g):
        if m[r] != -np.inf:
            _estimate_finish(acc[r], den[r], m[r], h, r0 + r, out, lse)


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def _estimate(scores, sizes, value_sums, est):
    hkv, g, _ = scores.shape
    dv = value_sums.shape[2]
    out = np.zeros((hkv, g, dv), dtype=np.float32)
    lse = np.full((hkv, g), -np.inf, dtype=np.float32)
    for item in nb.prange(hkv * g):                   # per query head: G x more items than KV heads
        _estimate_heads(scores, sizes, value_sums, item // g, est[item // g], item % g, item % g + 1, out, lse)
    return out, lse


def estimate_partial(scores, sizes, value_sums, estimation):
    """Same contract as :func:`retrokv.reference.wave_index.estimate_partial`; one weighted pass."""
    if any_cupy(scores, value_sums):
        return cuda("wave_index").estimate_partial(scores, sizes, value_sums, estimation)
    hkv, g, _ = scores.shape
    out, lse = _estimate(scores, sizes, value_sums, np.ascontiguousarray(estimation, dtype=np.int64))
    return out.reshape(hkv * g, -1), lse.reshape(hkv * g)


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def _decode_step(qb, cent, sizes, value_sums, steady_k, steady_v, steady_ids, mk, mv, mids, offsets, n_retrieve,
                 top, scale, max_logit):
    """Steps 1-3 of the reference driver in one kernel, per KV head: rank, select, exact zone in place,
    estimate (the caller merges the two partials with :func:`~retrokv.fast.attention._merge_pair`, the
    composed path's merge arithmetic). ``ok`` is False (nothing else computed) when a rank is NaN: the caller then takes the
    composed path, whose selection follows the reference's sort on NaN."""
    hkv, g, _ = qb.shape
    c, dv = cent.shape[1], value_sums.shape[2]
    scores = np.empty((hkv, g, c), dtype=np.float32)
    rank = np.zeros((hkv, c), dtype=np.float32)
    best = np.empty((hkv, top), dtype=np.int64)
    lengths = np.full(hkv, steady_k.shape[1], dtype=np.int64)
    nan = np.zeros(hkv, dtype=np.bool_)
    nr = min(n_retrieve, top)
    for h in nb.prange(hkv):                         # 1. rank the clusters, and split them into zones
        _score_centroids(qb, cent, sizes, scale, h, 0, c, scores)
        _group_rank_head(scores, h, max_logit, rank)
        for i in range(c):
            nan[h] = nan[h] or rank[h, i] != rank[h, i]
        if top > 0 and not nan[h]:
            _select_head(rank[h], top, nr, best[h])
            for j in range(nr):
                lengths[h] += offsets[h, best[h, j] + 1] - offsets[h, best[h, j]]
    if nan.any():
        return False, scores, rank, scores, rank, best, np.empty((hkv, 0), dtype=np.int64), lengths
    ids = np.empty((hkv, lengths.max() if hkv else 0), dtype=np.int64)
    out_x = np.zeros((hkv, g, dv), dtype=np.float32)
    lse_x = np.full((hkv, g), -np.inf, dtype=np.float32)
    out_e, lse_e = out_x.copy(), lse_x.copy()
    for h in nb.prange(hkv):                         # 2. exact zone; 3. estimation zone
        _attend_head(qb, h, steady_k, steady_v, steady_ids, mk, mv, mids, offsets, best[h, :nr], lengths[h], scale,
                     out_x, lse_x, ids)
        _estimate_heads(scores, sizes, value_sums, h, best[h, nr:top], 0, g, out_e, lse_e)
    return True, out_x, lse_x, out_e, lse_e, best, ids, lengths


def _fused_step(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale, group_rank):
    """:func:`_decode_step` with the driver's contract, or ``None`` when it declines (a NaN rank)."""
    hkv, c, d = meta.centroids.shape
    top = min(c, n_retrieve + n_estimate)
    qb = np.ascontiguousarray(np.asarray(q, dtype=np.float32).reshape(hkv, -1, d))
    ok, out_x, lse_x, out_e, lse_e, best, ids, lengths = _decode_step(
        qb, meta.centroids, meta.sizes, meta.value_sums, steady_k, steady_v, np.asarray(steady_ids, dtype=np.int64),
        meta.keys, meta.values, meta.ids, meta.offsets, n_retrieve, top, np.float32(scale), group_rank == "max_logit")
    if not ok:
        return None
    nr, hq = min(n_retrieve, top), q.shape[0]
    out, lse = _merge_pair(out_x.reshape(hq, -1), lse_x.reshape(hq),           # 4. log-sum-exp merge
                           out_e.reshape(hq, -1), lse_e.reshape(hq))
    return out, lse, Zones(best[:, :nr], best[:, nr:top], [ids[h, :lengths[h]] for h in range(hkv)])


def tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale=None,
                         gather=None, workspace=None, ops=None, group_rank="softmax_sum", radii=None,
                         radius_weight=0.0, n_plain=0):
    """The reference driver :func:`retrokv.reference.wave_index.tripartite_attention` with this module's kernels
    (the CUDA kernels of :mod:`retrokv.fast.cuda.wave_index` for CuPy input).

    A step below :data:`FUSED_MAX_WORK` (e.g. a 32K-token decode step), or with more KV heads than Numba
    threads, without a custom ``gather`` runs the driver's four steps as ONE kernel (:func:`_decode_step`,
    built from the same per-head kernels, parallel over the KV heads): a small step computes for well
    under a millisecond, so the dozen NumPy calls and kernel launches between the steps are worth
    saving, and a large one reads each KV head's centroids and clusters once, in one pass. The fused kernel
    ranks by centroid scores only: a ball-bound ranking (``radius_weight``) takes the composed path."""
    _ref.check_group_rank(group_rank)
    if ops is None and any_cupy(q, steady_k, steady_v):
        ops = cuda("wave_index")
    elif ops is None:
        require_numpy("tripartite_attention", q, steady_k, steady_v)
        hq, d = q.shape
        scale = 1.0 / np.sqrt(d) if scale is None else scale
        work = hq * d * (meta.centroids.shape[1] + steady_k.shape[1])        # centroid scores + steady zone
        with threads_for(work):
            if gather is None and not radius_weight and _fused(work, meta.centroids.shape[0]):
                res = _fused_step(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale, group_rank)
                if res is not None:
                    return res
            return _ref.tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate,
                                             scale, gather, workspace, ops=sys.modules[__name__],
                                             group_rank=group_rank, radii=radii, radius_weight=radius_weight,
                                             n_plain=n_plain)
    return _ref.tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale,
                                     gather, workspace, ops=ops, group_rank=group_rank, radii=radii,
                                     radius_weight=radius_weight, n_plain=n_plain)
