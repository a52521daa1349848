"""RetroInfer's tripartite attention on the GPU: the kernels the reference driver plugs in (``ops``).

Same names, signatures and results as ``reference/wave_index.py`` for the steps of one decode step
(RetroInfer §4.1-4.2); the driver that sequences them is the reference's ``tripartite_attention``
(DESIGN.md: a driver is written once), which takes this module as its ``ops``:

* :func:`rank_clusters`: centroid scores as one batched GEMM through ``xp`` (``(Hkv, G, d) @ (Hkv, d, C)``),
  then :func:`_rank_kernel`, one block per KV head with threads over clusters: it masks empty clusters
  to ``-inf`` and, for each of the G query heads, a block max and a block sum give that head's
  softmax, which is added into the group's ranking (softmax summed over the GQA group, §4.2);
* :func:`cluster_radii` (for the opt-in ball-bound ranking, ``radius_weight > 0``): one block per (KV head,
  cluster), threads over the cluster's rows of the cluster-sorted keys, a block max of their distances to
  the centroid; recomputed only when an index update changes the clusters;
* :func:`select_zones`: a stable sort of the ranking per head (``xp``): retrieval zone first, then
  the estimation zone; ties go to the lower cluster id, as in the reference;
* :func:`gather_execution_buffer`: one block per (KV head, retrieved cluster) plus one per head for
  the steady zone, copying contiguous rows of the cluster-sorted KV copy into
  ``[steady | retrieved in rank order]``; threads stride over the flattened rows so reads are coalesced;
* :func:`estimate_partial`: weighted flash-decoding (Eq. 2), one block per query head, threads over
  ``dv``. A tile of estimation clusters gets its weights ``w_i = exp(score_i - max)`` in shared memory;
  the denominator adds ``s_i w_i`` (the size weights only the denominator) and each thread's columns
  add ``w_i VS_i``. Output ``(out, lse)`` with ``lse = max + log sum_i s_i w_i``: merged with the exact
  partial by :func:`merge_partials`, these are exactly Eq. 2's weights;
* :func:`partial_attention`, :func:`merge_partials`: the split-K kernels of :mod:`.attention`;
* :func:`attend_retrieved` = :func:`gather_execution_buffer` then :func:`attend_execution_buffer`, the
  exact partial over the whole padded buffer in one launch
  (the split-K kernel with a per-row key limit ``lengths[h]``), where the reference op slices one
  head at a time (``Hkv`` launches, which at batch 8 would be 64 small ones).

``gather_execution_buffer`` returns ``lengths`` as a host (NumPy) array: it copies the ``Hkv``
lengths to the host once to size the buffer; the driver reads them for the zones' ids.
"""
from __future__ import annotations

import math
import sys

import numpy as np
from numba import cuda, float32

from retrokv.reference import wave_index as _ref
from retrokv.reference.wave_index import ExecBuffer, MetaIndex, Zones, concat_meta  # types and appends: not hot

from ._lanes import lanes
from ._xp import MAX_TILE, argsort_stable, asnumpy, float_array, geometry, launch, xp
from .attention import attention_partials, merge_chunks, merge_partials, partial_attention
from .clustering import segmented_kmeans

__all__ = ["MetaIndex", "ExecBuffer", "Zones", "empty_meta", "build_meta_index", "concat_meta",
           "cluster_radii", "rank_clusters", "select_zones", "gather_execution_buffer", "estimate_partial",
           "partial_attention", "merge_partials", "attend_execution_buffer", "attend_retrieved",
           "tripartite_attention"]

NEG_INF = float32(-math.inf)


def empty_meta(hkv, d, dv, m=np):
    """A wave index with no clusters, in namespace ``m``."""
    z = m.zeros
    return MetaIndex(z((hkv, 0, d), np.float32), z((hkv, 0, dv), np.float32), z((hkv, 0), np.int64),
                     z((hkv, 1), np.int64), z((hkv, 0, d), np.float32), z((hkv, 0, dv), np.float32),
                     z((hkv, 0), np.int64))


def build_meta_index(keys, values, positions, n_clusters, n_segments, iters=10):
    """Same contract as :func:`retrokv.reference.wave_index.build_meta_index`; k-means on the GPU."""
    m = xp(keys, values)
    hkv, n, d = keys.shape
    dv = values.shape[2]
    if n == 0 or n_clusters == 0:
        return empty_meta(hkv, d, dv, m)
    positions = m.asarray(positions, dtype=np.int64)
    heads = []
    for h in range(hkv):
        kh, vh = float_array(m, keys[h]), float_array(m, values[h])
        c = segmented_kmeans(kh, vh, n_clusters, n_segments, iters)
        heads.append((c.centroids, c.value_sums, c.sizes, c.offsets, kh[c.order], vh[c.order], positions[c.order]))
    return MetaIndex(*(m.stack([hd[f] for hd in heads]) for f in range(7)))


@cuda.jit
def _rank_kernel(scores, sizes, rank):
    """Block ``h``: mask empty clusters, softmax each query head's scores, sum over the group into ``rank[h]``."""
    red = cuda.shared.array(MAX_TILE, float32)     # one partial max / sum per thread
    g, c = scores.shape[1], scores.shape[2]
    h = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for i in range(tid, c, nt):
        rank[h, i] = float32(0.0)
    for r in range(g):
        mx = NEG_INF
        for i in range(tid, c, nt):
            if sizes[h, i] == 0:
                scores[h, r, i] = NEG_INF          # an empty cluster is never ranked
            mx = max(mx, scores[h, r, i])
        red[tid] = mx
        cuda.syncthreads()
        mx = NEG_INF
        for t in range(nt):                        # every thread reads the nt partial maxima
            mx = max(mx, red[t])
        cuda.syncthreads()
        if mx == NEG_INF:                          # every cluster empty: this head adds nothing
            continue
        z = float32(0.0)
        for i in range(tid, c, nt):
            z += float32(math.exp(scores[h, r, i] - mx))
        red[tid] = z
        cuda.syncthreads()
        z = float32(0.0)
        for t in range(nt):
            z += red[t]
        cuda.syncthreads()
        for i in range(tid, c, nt):                # each thread owns its clusters: no race on rank
            rank[h, i] += float32(math.exp(scores[h, r, i] - mx)) / z


def rank_clusters(q, centroids, sizes, scale, group_rank="softmax_sum", radii=None, radius_weight=0.0, n_plain=0):
    """Same contract as :func:`retrokv.reference.wave_index.rank_clusters`: ``(scores (Hkv, G, C), rank (Hkv, C))``.

    ``group_rank="max_logit"`` masks and reduces over the group through ``xp`` (two element-wise passes over
    ``(Hkv, G, C)``; the reduction is within a thread's cluster, no block reduction to write)."""
    _ref.check_group_rank(group_rank)
    _ref.check_radii(radii, radius_weight, centroids.shape[:2])
    n_plain = _ref.check_n_plain(n_plain, radius_weight)
    m = xp(q, centroids)
    hkv, c, d = centroids.shape
    qb = float_array(m, q).reshape(hkv, -1, d)                          # (Hkv, G, d)
    scores = m.ascontiguousarray(m.matmul(qb, centroids.transpose(0, 2, 1)) * np.float32(scale))  # (Hkv, G, C)
    rank = m.zeros((hkv, c), np.float32)
    if not c:
        return scores, rank
    by = scores
    if group_rank == "max_logit" or radius_weight:
        # mask here, so the returned scores are the ones Eq. 2 reads; the ball bound (ranked only) is a copy
        scores = m.ascontiguousarray(m.where(sizes[:, None, :] > 0, scores, np.float32(-np.inf)).astype(np.float32))
        by = _ref.ball_bound(scores, qb, radii, radius_weight, scale) if radius_weight else scores
    rank = _group_ranking(m, by, sizes, group_rank)
    if n_plain:                                # the plain ranking's best n_plain lead the ball-bound order
        rank = _ref.lead_with(rank, select_zones(_group_ranking(m, scores, sizes, group_rank), n_plain, 0)[0])
    return scores, rank


@cuda.jit
def _radii_kernel(keys, centroids, offsets, out):
    """Block ``b``: cluster ``b % C`` of KV head ``b // C``. Threads stride over the cluster's rows of the
    cluster-sorted keys, each keeping its largest squared distance from the centroid; thread 0 takes the
    block's max and writes its square root (0 for an empty cluster)."""
    c = centroids.shape[1]
    h, i = cuda.blockIdx.x // c, cuda.blockIdx.x % c
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    red = cuda.shared.array(MAX_TILE, float32)     # one partial max per thread
    best = float32(0.0)
    for row in range(offsets[h, i] + tid, offsets[h, i + 1], nt):
        s = float32(0.0)
        for j in range(keys.shape[2]):
            x = keys[h, row, j] - centroids[h, i, j]
            s += x * x
        best = max(best, s)
    red[tid] = best
    cuda.syncthreads()
    if tid == 0:
        for t in range(1, nt):
            best = max(best, red[t])
        out[h, i] = math.sqrt(best)


def cluster_radii(meta):
    """Same contract as :func:`retrokv.reference.wave_index.cluster_radii`: ``(Hkv, C)`` float32, each cluster's
    largest key distance from its centroid, one block per (KV head, cluster) (:func:`_radii_kernel`)."""
    m = xp(meta.keys, meta.centroids)
    hkv, c, _ = meta.centroids.shape
    out = m.zeros((hkv, c), np.float32)
    launch(_radii_kernel, hkv * c, meta.keys, meta.centroids, m.ascontiguousarray(meta.offsets), out)
    return out


def _group_ranking(m, by, sizes, group_rank):
    """:func:`retrokv.reference.wave_index.group_ranking` on the device (``by`` is masked in place)."""
    if group_rank == "max_logit":
        return m.ascontiguousarray(by.max(axis=1))                      # (Hkv, C)
    rank = m.zeros((by.shape[0], by.shape[2]), np.float32)                 # (Hkv, C)
    launch(_rank_kernel, by.shape[0], by, m.ascontiguousarray(sizes), rank)
    return rank


def select_zones(rank, n_retrieve, n_estimate):
    """Same contract as the reference: stable sort by rank, best first; ``(retrieval (Hkv, r), estimation (Hkv, e))``,
    the estimation zone in cluster-id order."""
    m = xp(rank)
    order = argsort_stable(m, -rank, axis=1)                            # (Hkv, C)
    return (m.ascontiguousarray(order[:, :n_retrieve]).astype(np.int64),
            m.ascontiguousarray(m.sort(order[:, n_retrieve:n_retrieve + n_estimate], axis=1)).astype(np.int64))


@cuda.jit(device=True)
def steady_rows(bk, bv, bids, steady_k, steady_v, steady_ids, h, tid, nt):
    """Rows ``0 .. S`` of head ``h``'s execution buffer: the steady zone (sinks + recent window), which
    leads every buffer; the block's threads over the columns of a row (``_lanes``)."""
    n = steady_k.shape[1]
    kr0, krs, kc0, kcs = lanes(bk.shape[2], tid, nt)
    vr0, vrs, vc0, vcs = lanes(bv.shape[2], tid, nt)
    for t in range(kr0, n, krs):
        for x in range(kc0, bk.shape[2], kcs):
            bk[h, t, x] = steady_k[h, t, x]
    for t in range(vr0, n, vrs):
        for x in range(vc0, bv.shape[2], vcs):
            bv[h, t, x] = steady_v[h, t, x]
    for t in range(tid, n, nt):
        bids[h, t] = steady_ids[t]


@cuda.jit
def _gather_kernel(bk, bv, bids, steady_k, steady_v, steady_ids, mk, mv, mids, offsets, retrieval, starts):
    """Block ``(h, j)``: ``j < r`` copies retrieved cluster ``retrieval[h, j]``, ``j == r`` the steady zone."""
    r = retrieval.shape[1]
    h = cuda.blockIdx.x // (r + 1)
    j = cuda.blockIdx.x % (r + 1)
    d, dv = bk.shape[2], bv.shape[2]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    if j == r:                                     # the steady zone goes first
        steady_rows(bk, bv, bids, steady_k, steady_v, steady_ids, h, tid, nt)
        return
    kr0, krs, kc0, kcs = lanes(d, tid, nt)        # consecutive threads, consecutive floats of a row
    vr0, vrs, vc0, vcs = lanes(dv, tid, nt)
    i = retrieval[h, j]
    a = offsets[h, i]                              # the cluster is rows a .. b of the sorted copy
    n = offsets[h, i + 1] - a
    dst = starts[h, j]
    for t in range(kr0, n, krs):
        for x in range(kc0, d, kcs):
            bk[h, dst + t, x] = mk[h, a + t, x]
    for t in range(vr0, n, vrs):
        for x in range(vc0, dv, vcs):
            bv[h, dst + t, x] = mv[h, a + t, x]
    for t in range(tid, n, nt):
        bids[h, dst + t] = mids[h, a + t]


def gather_execution_buffer(meta, steady_k, steady_v, steady_ids, retrieval, workspace=None):
    """Same contract as the reference: ``[steady | retrieved clusters in rank order]`` per head (lengths on the host).

    ``workspace`` is accepted for the shared signature; the device buffer is allocated per step
    (CuPy's memory pool makes that cheap)."""
    m = xp(steady_k, meta.keys, retrieval)
    hkv, s, d = steady_k.shape
    dv = steady_v.shape[2]
    retrieval = m.ascontiguousarray(m.asarray(retrieval), dtype=np.int64)
    r = retrieval.shape[1]
    sizes = m.take_along_axis(meta.sizes, retrieval, axis=1)            # (Hkv, r)
    ends = s + m.cumsum(sizes, axis=1)
    starts = m.ascontiguousarray(ends - sizes)                          # first buffer row of each cluster
    lengths = asnumpy(ends[:, -1] if r else m.full(hkv, s)).astype(np.int64)
    width = int(lengths.max(initial=0))
    bk = m.zeros((hkv, width, d), np.float32)
    bv = m.zeros((hkv, width, dv), np.float32)
    bids = m.zeros((hkv, width), np.int64)
    if width:
        launch(_gather_kernel, hkv * (r + 1), bk, bv, bids, float_array(m, steady_k), float_array(m, steady_v),
               m.ascontiguousarray(m.asarray(steady_ids), dtype=np.int64), meta.keys, meta.values, meta.ids,
               meta.offsets, retrieval, starts)
    return ExecBuffer(bk, bv, bids, lengths)


@cuda.jit
def _estimate_kernel(scores, sizes, value_sums, est, tile, out, lse):
    """Block ``b``: query head ``b`` (KV head ``b // G``), weighted flash-decoding over its estimation clusters."""
    w_sh = cuda.shared.array(MAX_TILE, float32)    # exp(score - max) of the tile's clusters
    s_sh = cuda.shared.array(MAX_TILE, float32)    # their sizes
    g = scores.shape[1]
    dv = value_sums.shape[2]
    e = est.shape[1]
    b = cuda.blockIdx.x
    h = b // g
    r = b % g
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    mx = NEG_INF
    for j in range(e):                             # the max over non-empty clusters (every thread)
        i = est[h, j]
        if sizes[h, i] > 0:
            mx = max(mx, scores[h, r, i])
    if mx == NEG_INF:                              # empty zone: (0, -inf), the merge identity
        for x in range(tid, dv, nt):
            out[b, x] = float32(0.0)
        if tid == 0:
            lse[b] = NEG_INF
        return
    for x in range(tid, dv, nt):
        out[b, x] = float32(0.0)
    den = float32(0.0)
    for j0 in range(0, e, tile):
        n = min(tile, e - j0)
        for jj in range(tid, n, nt):
            i = est[h, j0 + jj]
            sz = sizes[h, i]
            s_sh[jj] = float32(sz)
            w_sh[jj] = float32(math.exp(scores[h, r, i] - mx)) if sz > 0 else float32(0.0)
        cuda.syncthreads()
        for jj in range(n):
            den += w_sh[jj] * s_sh[jj]             # the size weights the denominator only
        for x in range(tid, dv, nt):
            a = out[b, x]
            for jj in range(n):                    # numerator: exp(score) * value sum
                a += w_sh[jj] * value_sums[h, est[h, j0 + jj], x]
            out[b, x] = a
        cuda.syncthreads()
    for x in range(tid, dv, nt):
        out[b, x] = out[b, x] / den
    if tid == 0:
        lse[b] = mx + float32(math.log(den))


def estimate_partial(scores, sizes, value_sums, estimation):
    """Same contract as :func:`retrokv.reference.wave_index.estimate_partial`: ``(out (Hq, dv), lse (Hq,))``."""
    m = xp(scores, value_sums)
    hkv, g, _ = scores.shape
    dv = value_sums.shape[2]
    out = m.zeros((hkv * g, dv), np.float32)
    lse = m.full(hkv * g, -np.inf, np.float32)
    estimation = m.ascontiguousarray(m.asarray(estimation), dtype=np.int64)
    if estimation.shape[1] and hkv * g:
        launch(_estimate_kernel, hkv * g, m.ascontiguousarray(scores), m.ascontiguousarray(sizes),
               float_array(m, value_sums), estimation, np.int64(geometry().tile), out, lse)
    return out, lse


def attend_execution_buffer(q, buf, scale):
    """Exact ``(out (Hq, dv), lse (Hq,))`` of ``q (Hq, d)`` over each head's rows ``:lengths[h]`` of ``buf``,
    in one split-K launch (equal to ``partial_attention`` per head, then concatenated)."""
    m = xp(q, buf.keys)
    q = float_array(m, q)
    hkv = buf.keys.shape[0]
    g = q.shape[0] // hkv
    limits = m.asarray(np.repeat(np.asarray(buf.lengths, np.int64), g))      # row h*G + j stops at lengths[h]
    return merge_chunks(*attention_partials(q, buf.keys, buf.values, 1, g, limits, scale, group_limits=True))


def attend_retrieved(q, meta, steady_k, steady_v, steady_ids, retrieval, scale, workspace=None):
    """The exact zone as the reference composes it: :func:`gather_execution_buffer` (one launch), then
    :func:`attend_execution_buffer` (one launch); ``workspace`` is unused on the device."""
    buf = gather_execution_buffer(meta, steady_k, steady_v, steady_ids, retrieval)
    return _ref.exact_from_buffer(sys.modules[__name__], q, buf, scale)


def tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale=None,
                         gather=None, workspace=None, ops=None, group_rank="softmax_sum", radii=None,
                         radius_weight=0.0, n_plain=0):
    """The reference driver :func:`retrokv.reference.wave_index.tripartite_attention` with these CUDA kernels."""
    return _ref.tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale,
                                     gather, workspace, ops=sys.modules[__name__] if ops is None else ops,
                                     group_rank=group_rank, radii=radii, radius_weight=radius_weight,
                                     n_plain=n_plain)
