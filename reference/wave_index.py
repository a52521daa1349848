"""RetroInfer's wave index: meta index, tripartite attention and accuracy-bounded estimation (NumPy).

RetroInfer (arXiv 2505.02922, §4.1-4.2) splits the context of every KV head into three zones for
one decode query ``q``:

* **steady zone**: the first 4 tokens (attention sinks) and the recent window; always exact;
* **retrieval zone**: the clusters whose centroids score highest (1.8% of the clusters); their
  keys and values are read in full and attended exactly;
* **estimation zone**: the next 23.2% of clusters; each one's contribution is *estimated* from its
  centroid ``C_i``, size ``s_i`` and value sum ``VS_i`` alone (Eq. 2):

      a~_i = exp(q.C_i) / (sum_exact exp(q.k_j) + sum_est s_j exp(q.C_j)),    o_est = sum_i a~_i VS_i

  so the cluster size weights only the denominator. Because ``C_i`` is the plain mean of the
  cluster's keys, Jensen's inequality gives ``s_i exp(q.C_i) <= sum_{j in i} exp(q.k_j)`` (Eq. 3):
  the estimate never over-counts a cluster's exp-mass.

Clusters outside both zones are dropped. Clusters are ranked by the softmax of the centroid scores,
summed over the query heads of a GQA group (one ranking, hence one set of zones, per KV head).
``group_rank="max_logit"`` is an opt-in variant that is not in the paper: each cluster ranks by the
best centroid score any head of its group gives it (see :func:`rank_clusters`); the ball-bound ranking
and its mix with the plain one (also opt-in, not in the paper) live in ``reference/_wave_ball.py``.
The exact part (steady + retrieval) and the estimate are combined by the log-sum-exp merge
(RetroInfer's weighted flash-decoding; RetrievalAttention App. B).

Layout (the wave buffer's host tier uses the same one): every KV head keeps a copy of its indexed
keys and values *sorted by cluster*, so cluster ``i`` is the contiguous range
``offsets[i]:offsets[i + 1]``; ``ids`` maps each row back to its token position.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from .attention import merge_partials, partial_attention
from ._wave_ball import ball_bound, check_n_plain, check_radii, cluster_radii, lead_with
from .clustering import _array_module, segmented_kmeans

__all__ = ["GROUP_RANKS", "cluster_radii", "MetaIndex", "ExecBuffer", "Zones", "Workspace", "empty_meta",
           "build_meta_index", "concat_meta", "rank_clusters", "select_zones", "gather_execution_buffer", "attend_execution_buffer",
           "attend_retrieved", "estimate_partial", "estimation_as_pseudo_tokens", "tripartite_attention"]


class MetaIndex(NamedTuple):
    """The wave index of all KV heads: per-cluster metadata plus the cluster-sorted KV copy."""

    centroids: np.ndarray    # (Hkv, C, d) float32, plain mean of each cluster's keys
    value_sums: np.ndarray   # (Hkv, C, dv) float32
    sizes: np.ndarray        # (Hkv, C) int64 (0 = empty cluster, never ranked)
    offsets: np.ndarray      # (Hkv, C + 1) int64 into the sorted arrays
    keys: np.ndarray         # (Hkv, M, d) float32, sorted by cluster
    values: np.ndarray       # (Hkv, M, dv) float32, sorted by cluster
    ids: np.ndarray          # (Hkv, M) int64 token position of each sorted row


class ExecBuffer(NamedTuple):
    """The execution buffer ``[steady | retrieved clusters]`` per KV head; head h uses rows ``:lengths[h]``."""

    keys: np.ndarray         # (Hkv, L, d)
    values: np.ndarray       # (Hkv, L, dv)
    ids: np.ndarray          # (Hkv, L) int64 token positions
    lengths: np.ndarray      # (Hkv,) int64


class Zones(NamedTuple):
    """What one decode step did: clusters per zone in rank order and the tokens attended exactly."""

    retrieval: np.ndarray    # (Hkv, r) int64 cluster ids, best first
    estimation: np.ndarray   # (Hkv, e) int64 cluster ids, best first
    exact_ids: list          # Hkv arrays of token positions attended exactly (steady + retrieved)


class Workspace:
    """Execution-buffer arrays reused from one decode step to the next, owned by one index.

    Allocating a fresh buffer every step (~20 MB at 128K tokens) costs more in page faults than the
    copy into it, so the fast path reuses one. It belongs to an index, never to a module: two
    indexes used from two threads never share it, and it is freed with its index. One index is
    still used by one thread at a time. The reference path allocates fresh arrays and ignores it.
    """

    def __init__(self):
        self._arrays = None

    def take(self, hkv, width, d, dv):
        """``(keys (Hkv, width, d), values (Hkv, width, dv), ids (Hkv, width))``, grown as needed.

        The views are C-contiguous (prefixes of flat storage, not slices of a wider array), so the
        kernels that read them compile for unit strides and vectorise."""
        need = (hkv * width * d, hkv * width * dv, hkv * width)
        a = self._arrays
        if a is None or any(len(x) < n for x, n in zip(a, need)):
            a = tuple(np.empty(max(n, int(1.25 * (len(x) if a is not None else 0))), t)
                      for n, x, t in zip(need, a or (None,) * 3, (np.float32, np.float32, np.int64)))
            self._arrays = a
        return (a[0][:need[0]].reshape(hkv, width, d), a[1][:need[1]].reshape(hkv, width, dv),
                a[2][:need[2]].reshape(hkv, width))


def empty_meta(hkv, d, dv):
    """A wave index with no clusters (short inputs: everything lives in the steady zone)."""
    z = np.zeros
    return MetaIndex(z((hkv, 0, d), np.float32), z((hkv, 0, dv), np.float32), z((hkv, 0), np.int64),
                     z((hkv, 1), np.int64), z((hkv, 0, d), np.float32), z((hkv, 0, dv), np.float32),
                     z((hkv, 0), np.int64))


def build_meta_index(keys, values, positions, n_clusters, n_segments, iters=10):
    """Cluster each KV head's ``keys (Hkv, M, d)`` and lay out the meta index and sorted KV copy.

    ``positions (M,)`` are the tokens' positions in the sequence (stored as ``ids``).
    """
    hkv, m, d = keys.shape
    dv = values.shape[2]
    if m == 0 or n_clusters == 0:
        return empty_meta(hkv, d, dv)
    heads = [segmented_kmeans(keys[h], values[h], n_clusters, n_segments, iters) for h in range(hkv)]
    positions = np.asarray(positions, dtype=np.int64)
    return MetaIndex(
        centroids=np.stack([c.centroids for c in heads]),
        value_sums=np.stack([c.value_sums for c in heads]),
        sizes=np.stack([c.sizes for c in heads]),
        offsets=np.stack([c.offsets for c in heads]),
        keys=np.stack([keys[h][c.order] for h, c in enumerate(heads)]),
        values=np.stack([values[h][c.order] for h, c in enumerate(heads)]),
        ids=np.stack([positions[c.order] for c in heads]),
    )


def concat_meta(a, b):
    """Append the clusters of ``b`` after those of ``a`` (index update, RetroInfer §4.2).

    Array-namespace aware: a CUDA index's meta index is appended on the device."""
    m = a.keys.shape[1]
    cat = _array_module(a.keys).concatenate
    return MetaIndex(
        cat([a.centroids, b.centroids], axis=1), cat([a.value_sums, b.value_sums], axis=1),
        cat([a.sizes, b.sizes], axis=1), cat([a.offsets, b.offsets[:, 1:] + m], axis=1),
        cat([a.keys, b.keys], axis=1), cat([a.values, b.values], axis=1), cat([a.ids, b.ids], axis=1))


GROUP_RANKS = ("softmax_sum", "max_logit")   # how a GQA group's query heads combine into one ranking


def check_group_rank(group_rank, name="group_rank"):
    """``group_rank`` if it names a ranking of :data:`GROUP_RANKS`, else a ``ValueError`` that lists them."""
    if not isinstance(group_rank, str) or group_rank not in GROUP_RANKS:
        raise ValueError(f"{name} must be one of {GROUP_RANKS}, got {group_rank!r}")
    return group_rank


def rank_clusters(q, centroids, sizes, scale, group_rank="softmax_sum", radii=None, radius_weight=0.0, n_plain=0):
    """Centroid scores ``(Hkv, G, C)`` and the GQA ranking ``(Hkv, C)`` of RetroInfer §4.2.

    ``scores[h, g, i] = q_{hG+g} . C_i * scale`` (``-inf`` for empty clusters). The ranking, per
    ``group_rank``:

    * ``"softmax_sum"`` (RetroInfer's): ``rank[h, i] = sum_g softmax_i(scores[h, g])``, the softmax over
      clusters of each query head's scores, summed over the G heads of the group;
    * ``"max_logit"`` (not in the paper; opt-in): ``rank[h, i] = max_g scores[h, g, i]``, the best score
      any head of the group gives the cluster (``-inf`` for an empty one). Under ``"softmax_sum"`` a head
      that puts its weight on one key is outvoted by the group's diffuse heads, whose softmaxes spread
      over many clusters (benchmarks/results/needle_recall.md measures it for SmolLM2's needle-reading
      heads); here the head with the largest logits orders the clusters it scores highest first.

    ``radius_weight`` ``w > 0`` (not in the paper; opt-in) ranks by a **ball bound** instead of the centroid
    score: ``scores[h, g, i] + w |q_{hG+g}| radii[h, i] * scale`` (``radii`` from :func:`cluster_radii`;
    ``w = 1`` bounds the cluster's best key score from above, by Cauchy-Schwarz). A centroid dilutes one sharp
    key among its cluster's; the radius gives a spread cluster that may hold one the benefit of the doubt.
    Only the ranking changes: the returned ``scores`` stay the centroid scores that Eq. 2 estimates with.

    ``n_plain > 0`` with a ball bound **mixes** the two rankings (not in the paper; opt-in): the first
    ``n_plain`` clusters of the plain ranking (centroid scores, the same ``group_rank``) rank first (``+inf``,
    :func:`lead_with`), and every other cluster follows in ball-bound order. A retrieval zone of ``R >
    n_plain`` clusters then holds the plain ranking's best ``n_plain``, where most of the attention mass is,
    and the ball bound's best ``R - n_plain`` of the rest, where a sharp key may hide.
    """
    hkv, c, d = centroids.shape
    check_group_rank(group_rank)
    check_radii(radii, radius_weight, (hkv, c))
    n_plain = check_n_plain(n_plain, radius_weight)
    qb = q.reshape(hkv, -1, d)                                          # (Hkv, G, d)
    scores = (qb @ centroids.transpose(0, 2, 1)) * np.float32(scale)   # (Hkv, G, C)
    scores = np.where(sizes[:, None, :] > 0, scores, -np.inf).astype(np.float32)
    if c == 0:
        return scores, np.zeros((hkv, 0), np.float32)
    by = ball_bound(scores, qb, radii, radius_weight, scale) if radius_weight else scores   # Eq. 2 keeps scores
    rank = group_ranking(by, group_rank)
    if n_plain:                                # the plain ranking's best n_plain lead the ball-bound order
        rank = lead_with(rank, select_zones(group_ranking(scores, group_rank), n_plain, 0)[0])
    return scores, rank


def group_ranking(by, group_rank):
    """``(Hkv, C)``: the scores ``by (Hkv, G, C)`` (``-inf`` for an empty cluster) of a GQA group's query heads
    combined into one ranking of its KV head, per ``group_rank`` (:func:`rank_clusters`)."""
    if group_rank == "max_logit":
        return by.max(axis=1)                                          # (Hkv, C), -inf: empty cluster
    m = by.max(axis=2, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)       # every cluster empty: no shift; a NaN row stays NaN, empty clusters too
    p = np.exp(by - m)                                                 # (Hkv, G, C)
    z = p.sum(axis=2, keepdims=True)
    return (p / np.where(z > 0, z, 1.0)).sum(axis=1).astype(np.float32)   # (Hkv, C)


def select_zones(rank, n_retrieve, n_estimate):
    """Sort clusters by rank (stable, best first): the first ``n_retrieve`` are retrieved (in rank order),
    the next ``n_estimate`` estimated. The estimation zone is a set (Eq. 2 sums over it): it is returned
    in cluster-id order, which reads the value sums front to back and spares a fast path its sort."""
    order = np.argsort(-rank, axis=1, kind="stable")                   # (Hkv, C)
    est = np.sort(order[:, n_retrieve:n_retrieve + n_estimate], axis=1)
    return order[:, :n_retrieve].astype(np.int64), est.astype(np.int64)


def gather_execution_buffer(meta, steady_k, steady_v, steady_ids, retrieval, workspace=None):
    """Copy ``[steady | retrieved clusters in rank order]`` per KV head into one padded buffer.

    ``workspace`` (a :class:`Workspace`) lets the fast path reuse its arrays; here it is unused.
    """
    hkv = steady_k.shape[0]
    heads = []
    for h in range(hkv):
        rows = np.concatenate([np.arange(meta.offsets[h, i], meta.offsets[h, i + 1]) for i in retrieval[h]]
                              + [np.zeros(0, np.int64)]).astype(np.int64)          # sorted-array rows
        heads.append((np.concatenate([steady_k[h], meta.keys[h][rows]]),
                      np.concatenate([steady_v[h], meta.values[h][rows]]),
                      np.concatenate([steady_ids, meta.ids[h][rows]])))
    return stack_heads(heads)


def stack_heads(heads):
    """Per-head ``(keys, values, ids)`` of different lengths -> one zero-padded :class:`ExecBuffer`."""
    lengths = np.array([len(ids) for _, _, ids in heads], dtype=np.int64)
    width = int(lengths.max(initial=0))

    def pad(x):
        return np.pad(x, [(0, width - len(x))] + [(0, 0)] * (x.ndim - 1))
    return ExecBuffer(np.stack([pad(k) for k, _, _ in heads]), np.stack([pad(v) for _, v, _ in heads]),
                      np.stack([pad(i) for _, _, i in heads]), lengths)


def estimate_partial(scores, sizes, value_sums, estimation):
    """Accuracy-bounded estimation (RetroInfer Eq. 2) as a partial ``(out (Hq, dv), lse (Hq,))``.

    For query head ``(h, g)`` over the estimation clusters ``E_h``:
    ``lse = log sum_{i in E} s_i exp(score_i)`` (the size weights the denominator only) and
    ``out = sum_{i in E} exp(score_i) VS_i / exp(lse)``. Merging it with the exact partial by
    log-sum-exp gives exactly Eq. 2's ``a~_i`` weights. An empty zone gives ``(0, -inf)``.
    """
    hkv, g, _ = scores.shape
    dv = value_sums.shape[2]
    s = np.take_along_axis(scores, estimation[:, None, :], axis=2)      # (Hkv, G, e)
    sz = np.take_along_axis(sizes, estimation, axis=1).astype(np.float32)   # (Hkv, e)
    vs = np.take_along_axis(value_sums, estimation[:, :, None], axis=1)   # (Hkv, e, dv)
    m = s.max(axis=2, keepdims=True) if s.shape[2] else np.full((hkv, g, 1), -np.inf, np.float32)
    m = np.where(np.isfinite(m), m, 0.0).astype(np.float32)
    w = np.exp(s - m)                                                  # (Hkv, G, e)
    den = (w * sz[:, None, :]).sum(axis=2)                              # (Hkv, G)
    num = w @ vs                                                       # (Hkv, G, dv)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den[..., None] > 0, num / den[..., None], 0.0)
        lse = np.log(den) + m[..., 0]                                  # log 0 = -inf: empty zone
    return out.reshape(hkv * g, dv).astype(np.float32), lse.reshape(hkv * g).astype(np.float32)


def estimation_as_pseudo_tokens(q, centroids, sizes, value_sums, estimation, scale):
    """The same estimate through plain attention: a cluster acts as ``s_i`` copies of its centroid.

    Each estimated cluster becomes one pseudo-token with key ``[C_i, log(s_i) / scale]`` against
    the query ``[q, 1]`` (the extra coordinate adds ``log s_i`` to its score) and value ``VS_i / s_i`` (the mean value);
    :func:`partial_attention` over these pseudo-tokens equals :func:`estimate_partial`. Used by the
    tests and the tutorial to show that the weighted flash-decoding is ordinary attention in disguise.
    """
    hkv, _, d = centroids.shape
    g = q.shape[0] // hkv
    outs, lses = [], []
    for h in range(hkv):
        e = estimation[h]
        e = e[sizes[h, e] > 0]                                         # an empty cluster has no mass
        k = np.concatenate([centroids[h, e], (np.log(sizes[h, e]) / scale)[:, None]], axis=1)   # (e, d+1)
        v = value_sums[h, e] / sizes[h, e][:, None]
        qh = np.concatenate([q[h * g:(h + 1) * g], np.ones((g, 1), np.float32)], axis=1)       # (G, d+1)
        o, l = partial_attention(qh, k[None].astype(np.float32), v[None].astype(np.float32), scale=scale)
        outs.append(o)
        lses.append(l)
    return np.concatenate(outs), np.concatenate(lses)


def attend_execution_buffer(q, buf, scale):
    """Exact partial attention over the execution buffer: ``(out (Hq, dv), lse (Hq,))``.

    Query head ``h * G + j`` reads the first ``buf.lengths[h]`` rows of KV head ``h`` (heads retrieve
    different numbers of tokens, so each head is its own :func:`partial_attention`). The result is
    one operand of the log-sum-exp merge with the estimation zone (RetroInfer §4.1).
    """
    hkv = buf.keys.shape[0]
    g = q.shape[0] // hkv
    parts = [partial_attention(q[h * g:(h + 1) * g], buf.keys[h:h + 1, :int(n)], buf.values[h:h + 1, :int(n)],
                               scale=scale) for h, n in enumerate(buf.lengths)]
    return np.concatenate([o for o, _ in parts]), np.concatenate([l for _, l in parts])


def exact_from_buffer(ops, q, buf, scale):
    """``(out, lse, exact_ids)`` of the exact zone from a filled execution buffer, with ``ops``' kernel;
    the ids are copies (the buffer may be a reused workspace)."""
    out, lse = ops.attend_execution_buffer(q, buf, scale)
    return out, lse, [buf.ids[h, :int(n)].copy() for h, n in enumerate(buf.lengths)]


def attend_retrieved(q, meta, steady_k, steady_v, steady_ids, retrieval, scale, workspace=None):
    """The exact zone of one step: ``(out (Hq, dv), lse (Hq,), exact_ids)`` over the steady zone and the
    retrieved clusters, with ``exact_ids`` the Hkv arrays of token positions attended.

    Here it is the two steps of the paper's data path: copy into the execution buffer
    (:func:`gather_execution_buffer`), then attend it (:func:`attend_execution_buffer`). A kernel may
    instead read the clusters where they lie (the fast path does: same result, no copy).
    """
    buf = gather_execution_buffer(meta, steady_k, steady_v, steady_ids, retrieval, workspace)
    return exact_from_buffer(_THIS, q, buf, scale)


def tripartite_attention(q, meta, steady_k, steady_v, steady_ids, n_retrieve, n_estimate, scale=None,
                         gather=None, workspace=None, ops=None, group_rank="softmax_sum", radii=None,
                         radius_weight=0.0, n_plain=0):
    """One decode step of RetroInfer's tripartite attention: returns ``(out (Hq, dv), lse (Hq,), Zones)``.

    ``q (Hq, d)``; ``steady_k/v (Hkv, S, d)`` and ``steady_ids (S,)`` hold the sinks and the recent
    window. ``gather(retrieval) -> ExecBuffer`` may replace the default copy from the sorted arrays
    (the wave buffer does, to read hits from its cache); it must not change what is attended.
    ``workspace``: the index's :class:`Workspace`. The driver is written once for every backend:
    ``ops`` supplies the kernels (``rank_clusters``, ``select_zones``, ``attend_retrieved``,
    ``attend_execution_buffer`` (with ``gather``), ``estimate_partial``, ``merge_partials``; default: this
    module's). ``group_rank``, ``radii``, ``radius_weight`` and ``n_plain``: how the clusters are ranked
    (:func:`rank_clusters`).
    """
    ops = _THIS if ops is None else ops
    d = steady_k.shape[2]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    # 1. rank clusters by the GQA-summed softmax of centroid scores (or the group's best score, or a ball bound
    #    led by the plain ranking's best n_plain); split into zones
    scores, rank = ops.rank_clusters(q, meta.centroids, meta.sizes, scale, group_rank, radii,
                                     radius_weight, n_plain)           # (Hkv, G, C), (Hkv, C)
    retrieval, estimation = ops.select_zones(rank, n_retrieve, n_estimate)
    # 2. exact attention over [steady | retrieved] (each head its own length); a custom gather fills
    #    the execution buffer from elsewhere (the wave buffer's cache)
    if gather is None:
        out_x, lse_x, exact_ids = ops.attend_retrieved(q, meta, steady_k, steady_v, steady_ids, retrieval, scale,
                                                       workspace)
    else:
        out_x, lse_x, exact_ids = exact_from_buffer(ops, q, gather(retrieval), scale)
    # 3. estimation zone from centroids, sizes and value sums; 4. log-sum-exp merge
    est = ops.estimate_partial(scores, meta.sizes, meta.value_sums, estimation)
    out, lse = ops.merge_partials([(out_x, lse_x), est])
    return out, lse, Zones(retrieval, estimation, exact_ids)


_THIS = sys.modules[__name__]
