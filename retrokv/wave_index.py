"""RetroInfer's wave index, public face: :class:`WaveConfig` and :class:`WaveIndex`.

``index = WaveIndex.build(keys, values)`` clusters the context (segmented spherical k-means,
RetroInfer §4.2), ``index.attend(q)`` runs one decode step of tripartite attention (steady zone
exact, retrieval zone exact, estimation zone from centroids, the rest dropped; §4.1 and Eq. 2), and
``index.append(k, v)`` adds generated tokens to the steady window, clustering every
``update_every`` tokens that leave it into ``update_clusters`` new clusters. The algorithms live in
``retrokv.reference.wave_index`` / ``retrokv.fast.wave_index``; this module holds the state,
validates inputs and picks the backend.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from numbers import Integral

import numpy as np

from . import _validate as V
from ._xp import resolve_device, to_device, to_host, xp
from .backend import impl, resolve
from .index import IndexStats, check_prefill_queries, resolve_config
from .reference.wave_index import check_group_rank

__all__ = ["WaveConfig", "WaveIndex", "WaveStats"]




@dataclass(frozen=True)
class WaveConfig:
    """Wave index settings; the defaults are RetroInfer's (§4.2, §5.1 and its released code).

    ``retrieval_budget`` and ``estimation_budget`` are **fractions** of the clusters, floats in
    ``[0, 1]``, recomputed as the index grows (which reproduces the paper's "+1 retrieval, +15
    estimation clusters per 64 new clusters"); ``1.0`` retrieves every cluster (full attention).
    ``retrieval_clusters`` / ``estimation_clusters`` are fixed cluster **counts**; when set they
    override the fraction. An int budget is refused (``retrieval_budget=1`` would read as "one
    cluster" to some and "100%" to others): use the count fields for counts. ``estimation=False``
    drops the estimation zone (the ablation of RetroInfer Fig. 19a).

    Short contexts, as RetroInfer's released code runs them: ``min_index_tokens`` is its offload
    mode's build threshold. While the context holds at most ``n_sink + n_local + min_index_tokens``
    tokens the index has no clusters and every token sits in the steady zone, so attention is exact
    (dense); a longer prompt is clustered at build, and a context that grows past the threshold is
    clustered by the ordinary update path. The default 1024 (the offload mode's 4 + 64 + 1024) keeps
    4K-8K prompts indexed; ``0`` clusters whatever is there. ``min_retrieval_tokens`` is a floor on
    the retrieval zone: at least ``ceil(min_retrieval_tokens / tokens_per_cluster)`` clusters are
    retrieved whatever the fraction gives (``0``, the default, is the paper's pure fraction; see
    docs/wave_index.md, "Short contexts", for what the measured frontier says about it).

    ``group_rank`` is how the query heads of a GQA group combine into the one ranking of their KV head:
    ``"softmax_sum"`` (the default, RetroInfer's: each head's softmax over the centroid scores, summed)
    or ``"max_logit"`` (not in the paper: each cluster's best centroid score over the group's heads, so
    that one sharp head is not outvoted by diffuse ones; see
    :func:`retrokv.reference.wave_index.rank_clusters` and docs/frontier.md for what it measures).
    ``radius_weight`` ``w > 0`` (not in the paper) ranks each cluster by a ball bound, its
    centroid score plus ``w |q|`` times its radius (:func:`retrokv.reference.wave_index.cluster_radii`),
    instead of the centroid score alone; ``0.0``, the default, is the paper's ranking. The estimate (Eq. 2)
    is unchanged. ``ball_share`` (with ``radius_weight > 0``; not in the paper) is the share of the
    retrieval zone the ball bound chooses: the first ``floor((1 - ball_share) R)`` of its ``R`` clusters
    are the plain ranking's best (centroid scores, as ``group_rank`` combines them), the rest and the
    estimation zone follow the ball-bound order (:func:`retrokv.reference.wave_index.rank_clusters`,
    ``n_plain``). ``1.0``, the default, lets the ball bound choose them all.
    """

    n_sink: int = 4                      # attention-sink tokens, always exact
    n_local: int = 64                    # recent window, always exact
    tokens_per_cluster: int = 16         # ~1 centroid per 16 keys
    segment_tokens: int = 8192           # k-means segment length
    kmeans_iters: int = 10               # per-segment rounds + the final global pass
    retrieval_budget: float = 0.018      # top 1.8% of clusters, attended exactly
    estimation_budget: float = 0.232     # next 23.2% of clusters, estimated
    update_every: int = 1024             # tokens leaving the window that trigger an index update
    update_clusters: int = 64            # clusters made from each update
    estimation: bool = True              # False: no estimation zone (ablation)
    scale: float | None = None           # score scale, default 1/sqrt(d)
    retrieval_clusters: int | None = None    # a fixed count of retrieved clusters (overrides the fraction)
    estimation_clusters: int | None = None   # a fixed count of estimated clusters (overrides the fraction)
    min_index_tokens: int = 1024         # dense (no clusters) until the middle exceeds this many tokens
    min_retrieval_tokens: int = 0        # floor on the retrieval zone, in tokens (0: the fraction alone)
    group_rank: str = "softmax_sum"      # GQA ranking: "softmax_sum" (RetroInfer) or "max_logit" (opt-in)
    radius_weight: float = 0.0           # > 0: rank by centroid score + w |q| radius (opt-in, not in the paper)
    ball_share: float = 1.0              # share of the retrieval zone chosen by that ball bound (the rest: plain)

    def __post_init__(self):
        ints = {"n_sink": 0, "n_local": 0, "tokens_per_cluster": 1, "segment_tokens": 1, "kmeans_iters": 1,
                "update_every": 1, "update_clusters": 1, "min_index_tokens": 0, "min_retrieval_tokens": 0}
        for name, low in ints.items():
            x = getattr(self, name)
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, Integral) or x < low:
                raise ValueError(f"WaveConfig.{name} must be an int >= {low}, got {x!r}")
            object.__setattr__(self, name, int(x))           # NumPy ints stored as Python ints
        for name, count in (("retrieval_budget", "retrieval_clusters"), ("estimation_budget", "estimation_clusters")):
            x = getattr(self, name)
            if isinstance(x, Integral) and not isinstance(x, (bool, np.bool_)):
                raise TypeError(f"WaveConfig.{name} is a fraction of the clusters, a float in [0, 1]; got the int "
                                f"{x!r}. For a fixed number of clusters use {count}={int(x)}; for all clusters, "
                                f"{name}=1.0")
            x = V.check_real(x, f"WaveConfig.{name}", "a float fraction in [0, 1]")
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"WaveConfig.{name} must be a float fraction in [0, 1], got {getattr(self, name)!r}")
            object.__setattr__(self, name, x)
            if getattr(self, count) is not None:
                object.__setattr__(self, count, V.check_int(getattr(self, count), f"WaveConfig.{count}", 0,
                                                            "None or an int >= 0 (a number of clusters)"))
        object.__setattr__(self, "estimation", V.check_bool(self.estimation, "WaveConfig.estimation"))
        object.__setattr__(self, "scale", V.check_scale(self.scale))
        check_group_rank(self.group_rank, "WaveConfig.group_rank")
        w = V.check_real(self.radius_weight, "WaveConfig.radius_weight", "a float >= 0")
        if not (w >= 0.0 and math.isfinite(w)):
            raise ValueError(f"WaveConfig.radius_weight must be a finite float >= 0, got {self.radius_weight!r}")
        object.__setattr__(self, "radius_weight", float(w))
        b = V.check_real(self.ball_share, "WaveConfig.ball_share", "a float in [0, 1]")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"WaveConfig.ball_share must be a float in [0, 1], got {self.ball_share!r}")
        if b != 1.0 and not w:
            raise ValueError(f"WaveConfig.ball_share={self.ball_share!r} shares the retrieval zone with the ball "
                             f"bound, which needs radius_weight > 0 (got radius_weight={self.radius_weight!r})")
        object.__setattr__(self, "ball_share", float(b))

    def n_retrieve(self, n_clusters):
        """Clusters in the retrieval zone when the index holds ``n_clusters``: ``retrieval_clusters``
        when set, else ``retrieval_budget`` of them (at least one for a positive budget); never fewer
        than ``ceil(min_retrieval_tokens / tokens_per_cluster)`` (capped at ``n_clusters``)."""
        floor = -(-self.min_retrieval_tokens // self.tokens_per_cluster)
        return int(min(n_clusters, max(_count(self.retrieval_budget, self.retrieval_clusters, n_clusters), floor)))

    def n_plain(self, n_clusters):
        """Retrieved clusters chosen by the plain ranking, not the ball bound: ``floor((1 - ball_share) R)``
        of the ``R = n_retrieve(n_clusters)``; 0 without a ball bound."""
        if not self.radius_weight:
            return 0
        return int(math.floor((1.0 - self.ball_share) * self.n_retrieve(n_clusters) + 1e-9))

    def indexes(self, n_middle):
        """Whether ``n_middle`` tokens between the sinks and the local window are clustered: more than
        ``min_index_tokens`` of them, and at least one cluster's worth (``tokens_per_cluster``)."""
        return n_middle > self.min_index_tokens and n_middle >= self.tokens_per_cluster

    def n_estimate(self, n_clusters):
        """Clusters in the estimation zone (never overlapping the retrieval zone)."""
        if not self.estimation:
            return 0
        return min(_count(self.estimation_budget, self.estimation_clusters, n_clusters),
                   n_clusters - self.n_retrieve(n_clusters))


def _count(fraction, count, n_clusters):
    if count is not None:
        return int(min(count, n_clusters))
    if fraction <= 0 or n_clusters == 0:
        return 0
    return int(min(n_clusters, max(1, math.floor(fraction * n_clusters + 1e-9))))


@dataclass(frozen=True, kw_only=True)
class WaveStats(IndexStats):
    """What one :meth:`WaveIndex.attend` did: the common :class:`~retrokv.index.IndexStats` plus the zones
    in detail. Per-head arrays are ``(Hkv,)``; retrieved clusters in rank order, estimated ones in id order.

    Common fields, for the wave index: ``tokens_attended`` counts steady + retrieved tokens per query
    head; ``keys_scored`` is 0 (no key is scored to choose: clusters are ranked by their centroids);
    ``meta_scored`` is ``Hq * C`` centroid scores; ``bytes_read`` counts what a GQA group shares once:
    the exact K and V, every centroid (and its radius, with ``radius_weight > 0``), the estimated clusters' value
    sums and the sizes.
    """

    steady_tokens: int                # sinks + recent window (+ tokens waiting for an index update)
    retrieval_clusters: np.ndarray    # (Hkv, r) cluster ids
    estimation_clusters: np.ndarray   # (Hkv, e) cluster ids
    dropped_clusters: int             # per head: clusters in neither zone
    retrieval_tokens: np.ndarray      # (Hkv,) tokens attended exactly from retrieved clusters
    estimation_tokens: np.ndarray     # (Hkv,) tokens covered by estimated clusters
    dropped_tokens: np.ndarray        # (Hkv,) tokens not looked at
    exact_ids: list                   # Hkv arrays: token positions attended exactly


class WaveIndex:
    """RetroInfer's wave index over one sequence's KV cache ``(Hkv, N, d)``; build with :meth:`build`."""

    def __init__(self, meta, steady_k, steady_v, steady_ids, n_tokens, n_sink, config, backend, device="cpu"):
        self.config, self.backend, self.device = config, backend, device
        self._mod = impl(backend, "wave_index", device)
        self._meta = meta
        self._sk, self._sv, self._sids = steady_k, steady_v, steady_ids   # (Hkv, S, d), (Hkv, S, dv), (S,)
        self._n, self._n_sink = n_tokens, n_sink
        self._sizes_of = self._sizes = self._indexed = None     # host copy of meta.sizes, for the statistics
        self._radii_of = self._radii = None                     # cluster radii of that meta (radius_weight > 0)
        # the reused execution buffer, this index's own (CPU paths; on the GPU CuPy's memory pool does this)
        ws = getattr(self._mod, "Workspace", None)
        self._workspace = ws() if ws is not None else None
        self.last_stats = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, keys, values, prefill_queries=None, *, config=None, backend=None, device=None,
              check_finite=True, **overrides):
        """Index ``keys``/``values`` ``(Hkv, N, d)`` (copied): sinks and the last ``n_local`` tokens stay
        exact, the middle is clustered. Fewer than ``tokens_per_cluster`` middle tokens: no clusters yet.
        ``prefill_queries`` is unused (the wave index needs none); ``config`` fields may be overridden
        by keyword (``WaveIndex.build(k, v, n_local=128)``).

        ``device``: ``None`` (infer: CuPy input means ``"cuda"``), ``"cpu"`` or ``"cuda"``. On ``"cuda"``
        (``backend="fast"``) the whole index lives in device memory and every step of RetroInfer §4.1-4.2
        (k-means, ranking, gather, estimation, merge) runs the kernels of :mod:`retrokv.fast.cuda`;
        host input is uploaded once here."""
        check_prefill_queries(prefill_queries, "WaveIndex")
        config = resolve_config(WaveConfig, config, overrides)
        check_finite = V.check_bool(check_finite, "check_finite")
        backend = resolve(backend)
        device = resolve_device(device, keys, values)
        mod = impl(backend, "wave_index", device)
        keys, values = V.check_kv(keys, values, finite=check_finite)
        keys, values = to_device(keys, device, "keys"), to_device(values, device, "values")
        m = xp(keys)
        hkv, n, d = keys.shape
        n_sink = min(config.n_sink, n)
        end = n - config.n_local
        if config.indexes(end - n_sink):
            c, s = impl(backend, 'clustering').plan_clusters(end - n_sink, config.tokens_per_cluster,
                                                            config.segment_tokens)
            meta = mod.build_meta_index(keys[:, n_sink:end], values[:, n_sink:end], m.arange(n_sink, end),
                                        c, s, config.kmeans_iters)
        else:
            end = n_sink
            meta = mod.empty_meta(hkv, d, values.shape[2])
            meta = type(meta)(*(m.asarray(x) for x in meta))      # where the KV lives
        ids = m.concatenate([m.arange(n_sink), m.arange(end, n)]).astype(np.int64)
        sk = m.ascontiguousarray(m.concatenate([keys[:, :n_sink], keys[:, end:]], axis=1))
        sv = m.ascontiguousarray(m.concatenate([values[:, :n_sink], values[:, end:]], axis=1))
        return cls(meta, sk, sv, ids, n, n_sink, config, backend, device)

    # ------------------------------------------------------------------ properties
    @property
    def meta(self):
        """The :class:`~retrokv.reference.wave_index.MetaIndex` (centroids, value sums, sizes, sorted KV)."""
        return self._meta

    @property
    def n_tokens(self):
        return self._n

    @property
    def n_clusters(self):
        return self._meta.centroids.shape[1]

    @property
    def n_retrieve(self):
        return self.config.n_retrieve(self.n_clusters)

    @property
    def n_estimate(self):
        return self.config.n_estimate(self.n_clusters)

    @property
    def steady(self):
        """``(keys (Hkv, S, d), values (Hkv, S, dv), ids (S,))`` of the steady zone."""
        return self._sk, self._sv, self._sids

    @property
    def shape(self):
        """``(Hkv, d, dv)``."""
        return self._sk.shape[0], self._sk.shape[2], self._sv.shape[2]

    # ------------------------------------------------------------------ decode
    def attend(self, q, return_lse=False, *, buffer=None, check_finite=True):
        """One decode step: ``q (Hq, d) -> out (Hq, dv)`` (and ``lse (Hq,)`` with ``return_lse``).

        ``buffer``: a :class:`retrokv.WaveBuffer` over this index; it changes where the retrieved
        KV is read from, never the result. Sets :attr:`last_stats` (a :class:`WaveStats`).
        """
        return_lse = V.check_bool(return_lse, "return_lse")
        check_finite = V.check_bool(check_finite, "check_finite")
        q = V.as_array(q, "q")
        hkv, d, dv = self.shape
        if q.ndim != 2 or q.shape[1] != d or q.shape[0] == 0 or q.shape[0] % hkv:
            raise ValueError(f"q must have shape (Hq, {d}) with Hq a positive multiple of Hkv={hkv}, "
                             f"got shape {tuple(q.shape)}")
        if check_finite:
            V.check_finite(q, "q")
        q = to_device(q, self.device, "q")
        q = xp(q).ascontiguousarray(q, dtype=np.float32)
        gather = None
        if buffer is not None:
            if getattr(buffer, "index", None) is not self:
                raise ValueError("buffer must be a WaveBuffer built over this index")
            gather = functools.partial(buffer.gather, workspace=self._workspace)
        radii = None
        if self.config.radius_weight:            # recomputed only when an update changed the index
            if self._radii_of is not self._meta:
                self._radii_of, self._radii = self._meta, self._mod.cluster_radii(self._meta)
            radii = self._radii
        out, lse, zones = self._mod.tripartite_attention(q, self._meta, self._sk, self._sv, self._sids,
                                                   self.n_retrieve, self.n_estimate, self.config.scale, gather,
                                                   self._workspace, group_rank=self.config.group_rank, radii=radii,
                                                   radius_weight=self.config.radius_weight,
                                                   n_plain=self.config.n_plain(self.n_clusters))
        # statistics are host values (the zones are Hkv x (r + e) ids: a small copy on the GPU path)
        zones = type(zones)(to_host(zones.retrieval), to_host(zones.estimation), to_host(zones.exact_ids))
        self.last_stats = self._stats(zones, q.shape[0])
        return (out, lse) if return_lse else out

    def _stats(self, zones, hq):
        meta, hkv = self._meta, self._sk.shape[0]
        d, dv = self._sk.shape[2], self._sv.shape[2]
        if self._sizes_of is not meta:        # the host sizes and their sums change only with the index
            self._sizes_of, self._sizes = meta, to_host(meta.sizes)
            self._indexed = self._sizes.sum(axis=1)
            self._flat_at = np.arange(hkv)[:, None] * self._sizes.shape[1]   # head h's sizes in sizes.ravel()
        steady, c, e = len(self._sids), meta.centroids.shape[1], zones.estimation.shape[1]
        # the exact zone is the steady tokens plus the retrieved clusters' tokens, per head; a decode
        # step is a few microseconds of these small sums (Python ints where a NumPy call costs more)
        r_tok = np.array([len(x) - steady for x in zones.exact_ids], dtype=np.int64)
        e_tok = self._sizes.ravel().take(zones.estimation + self._flat_at).sum(axis=1)
        dropped = self._indexed - r_tok - e_tok
        r_sum, e_sum, g = int(r_tok.sum()), int(e_tok.sum()), hq // hkv
        exact_sum = hkv * steady + r_sum
        attended = g * exact_sum
        return WaveStats(
            n_tokens=self._n, tokens_attended=attended, keys_scored=0, meta_scored=hq * c,
            bytes_read=4 * (exact_sum * (d + dv) + hkv * c * (d + (self.config.radius_weight > 0)) + hkv * e * dv)
            + 8 * hkv * c,
            density=attended / max(hq * self._n, 1),
            zones={"steady": hq * steady, "retrieval": g * r_sum, "estimation": g * e_sum,
                   "dropped": int(g * dropped.sum())},
            steady_tokens=steady, retrieval_clusters=zones.retrieval, estimation_clusters=zones.estimation,
            dropped_clusters=c - zones.retrieval.shape[1] - e,
            retrieval_tokens=r_tok, estimation_tokens=e_tok, dropped_tokens=dropped,
            exact_ids=zones.exact_ids)

    # ------------------------------------------------------------------ update
    def append(self, k, v, check_finite=True):
        """Add generated tokens ``k, v`` of shape ``(Hkv, d)`` (one token) or ``(Hkv, n, d)``.

        They join the steady window; whenever ``n_local + update_every`` tokens wait there, the
        oldest ``update_every`` are clustered into ``update_clusters`` new clusters (RetroInfer §4.2).
        Returns the number of clusters added.
        """
        hkv, d, dv = self.shape
        k, v = V.check_append(k, v, hkv, d, dv, finite=V.check_bool(check_finite, "check_finite"))
        k, v = to_device(k, self.device, "k"), to_device(v, self.device, "v")
        m = xp(self._sk)
        n = k.shape[1]
        self._sk = m.concatenate([self._sk, k], axis=1)
        self._sv = m.concatenate([self._sv, v], axis=1)
        self._sids = m.concatenate([self._sids, m.arange(self._n, self._n + n, dtype=np.int64)])
        self._n += n
        added = 0
        cfg, mod = self.config, self._mod
        while (len(self._sids) - self._n_sink >= cfg.n_local + cfg.update_every
               and (self.n_clusters or cfg.indexes(len(self._sids) - self._n_sink - cfg.n_local))):
            lo, hi = self._n_sink, self._n_sink + cfg.update_every
            c = min(cfg.update_clusters, cfg.update_every)
            new = mod.build_meta_index(self._sk[:, lo:hi], self._sv[:, lo:hi], self._sids[lo:hi], c, 1,
                                       cfg.kmeans_iters)
            self._meta = mod.concat_meta(self._meta, new)
            self._sk = m.ascontiguousarray(m.concatenate([self._sk[:, :lo], self._sk[:, hi:]], axis=1))
            self._sv = m.ascontiguousarray(m.concatenate([self._sv[:, :lo], self._sv[:, hi:]], axis=1))
            self._sids = m.concatenate([self._sids[:lo], self._sids[hi:]])
            added += c
        return added

    def __repr__(self):
        hkv, d, dv = self.shape
        return (f"WaveIndex(Hkv={hkv}, d={d}, tokens={self._n}, clusters={self.n_clusters}, "
                f"steady={len(self._sids)}, retrieve={self.n_retrieve}, estimate={self.n_estimate}, "
                f"backend={self.backend!r}, device={self.device!r})")
