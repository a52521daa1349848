"""Baselines for sparse decode attention: StreamingLLM, exact top-k, IVF and Quest.

All implement the decode-index interface of :mod:`retrokv.index`::

    index = IVFIndex.build(keys, values, config=IVFConfig(), backend="fast")   # one layer, (Hkv, N, d)
    out = index.attend(q)                  # (Hq, d) -> (Hq, dv); return_lse=True adds lse (Hq,)
    ids, n_scanned = index.search(q, k)    # (Hq, k) token positions, keys scored per head
    index.append(k, v)                     # generated tokens (Hkv, d) or (Hkv, n, d): join the static window
    index.last_stats                       # an IndexStats

``build`` also takes keyword overrides of the config fields: ``IVFIndex.build(k, v, nprobe=8)``.
Static tokens (sink + recent + generated) are attended exactly and never indexed, as in
RetrievalAttention §3.3, so every retrieval baseline is compared on the same footing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _validate as V
from .sparse import SparseIndex, check_int

__all__ = ["StreamingConfig", "TopKConfig", "IVFConfig", "QuestConfig",
           "StreamingLLM", "TopKOracle", "IVFIndex", "QuestIndex"]


def _validate_fields(cfg, positive=(), nonneg=(), optional=()):
    for name in positive:
        val = getattr(cfg, name)
        if val is not None or name not in optional:     # None only where the field documents it (n_lists, nprobe)
            check_int(val, f"{type(cfg).__name__}.{name}", 1)
    for name in nonneg:
        check_int(getattr(cfg, name), f"{type(cfg).__name__}.{name}", 0)


@dataclass(frozen=True)
class StreamingConfig:
    """StreamingLLM (arXiv 2309.17453, §3.2): 4 attention-sink tokens + a sliding window (1020 here,
    a 1024-token cache)."""
    n_sink: int = 4
    n_recent: int = 1020

    def __post_init__(self):
        _validate_fields(self, nonneg=("n_sink", "n_recent"))


@dataclass(frozen=True)
class TopKConfig:
    """Exact top-k ("Flat" in RetrievalAttention §4): the static pattern of RA §3.3 (128 sink + 512
    recent) plus the ``top_k = 100`` best-scoring indexed keys."""
    n_sink: int = 128
    n_recent: int = 512
    top_k: int = 100

    def __post_init__(self):
        _validate_fields(self, positive=("top_k",), nonneg=("n_sink", "n_recent"))


@dataclass(frozen=True)
class IVFConfig:
    """IVF (FAISS IndexIVFFlat) as RetrievalAttention's baseline: k-means lists over the indexed keys.

    ``n_lists=None`` takes FAISS's rule of thumb ``round(4 sqrt(n))``; ``nprobe=None`` probes
    ``ceil(probe_fraction * n_lists)`` lists. RA §2.4 reports IVF needs 30-50 % of keys scanned for
    recall@100 > 0.95 on real Q/K; 10 % is a cheaper operating point (see docs/baselines.md).
    """
    n_sink: int = 128
    n_recent: int = 512
    top_k: int = 100
    n_lists: int | None = None
    nprobe: int | None = None
    probe_fraction: float = 0.1
    iters: int = 10

    def __post_init__(self):
        _validate_fields(self, positive=("top_k", "n_lists", "nprobe", "iters"), nonneg=("n_sink", "n_recent"),
                         optional=("n_lists", "nprobe"))
        # NumPy floats are fractions too; True is not (it used to pass as 1)
        frac = V.check_real(self.probe_fraction, "IVFConfig.probe_fraction", "a float in (0, 1]")
        if not 0 < frac <= 1:
            raise ValueError(f"IVFConfig.probe_fraction must be in (0, 1], got {self.probe_fraction!r}")
        object.__setattr__(self, "probe_fraction", frac)


@dataclass(frozen=True)
class QuestConfig:
    """Quest (arXiv 2406.10774): 16-key pages, element-wise min/max bound, a budget of 1024 tokens
    (64 pages) read per head on top of the static tokens. Quest keeps the first two layers dense;
    that choice belongs to the caller (one index is one layer).

    Quest reads whole pages: ``attend`` reads ``token_budget // page_size`` pages, i.e. the budget
    rounded down to whole pages, so ``token_budget`` must be at least ``page_size`` (a smaller budget
    used to read one whole page silently)."""
    n_sink: int = 128
    n_recent: int = 512
    page_size: int = 16
    token_budget: int = 1024
    top_k: int = 100            # only for search(): the keys ranked exactly inside the chosen pages

    def __post_init__(self):
        _validate_fields(self, positive=("page_size", "token_budget", "top_k"), nonneg=("n_sink", "n_recent"))
        if self.token_budget < self.page_size:
            raise ValueError(f"QuestConfig.token_budget must be >= page_size ({self.page_size}): Quest reads whole "
                             f"pages, got token_budget={self.token_budget}")


class TopKOracle(SparseIndex):
    """Exact top-k retrieval: scores every indexed key (the ceiling for any index at budget k)."""

    CONFIG = TopKConfig

    def _search(self, q3, k):
        ids, scanned = self._impl.exact_topk(q3, self._ikeys, k)
        return ids, scanned, 0


class StreamingLLM(SparseIndex):
    """StreamingLLM: attend to ``n_sink`` first tokens and a sliding window of ``n_recent``; the rest
    is evicted (no retrieval). Generated tokens enter the window and push the oldest out."""

    CONFIG = StreamingConfig

    def _retrieve(self, q3):
        hq = q3.shape[0]
        return np.full((hq, 1, 0), -1, np.int64), np.zeros((hq, 1), np.int64), 0

    def search(self, q, k=None):
        raise NotImplementedError("StreamingLLM evicts tokens and has no search; use TopKOracle for exact top-k")

    def _append_one(self, k, v):
        super()._append_one(k, v)
        s, cap = min(self.config.n_sink, self.n_tokens), self.config.n_sink + self.config.n_recent
        if self._ns > cap:                             # slide: the oldest non-sink token leaves the window
            self._sk[:, s:self._ns - 1] = self._sk[:, s + 1:self._ns].copy()
            self._sv[:, s:self._ns - 1] = self._sv[:, s + 1:self._ns].copy()
            self._static_pos = np.delete(self._static_pos, s)
            self._ns -= 1


class IVFIndex(SparseIndex):
    """IVF: k-means lists over the indexed keys (one quantizer per KV head), probed by centroid score."""

    CONFIG = IVFConfig

    def _setup(self, prefill_queries):
        cfg = self.config
        hkv, n, d = self._ikeys.shape
        c = max(1, min(n, cfg.n_lists if cfg.n_lists else round(4 * math.sqrt(n)))) if n else 1
        self.n_lists = c
        self.nprobe = min(c, cfg.nprobe if cfg.nprobe else math.ceil(cfg.probe_fraction * c))
        self.centroids = np.zeros((hkv, c, d), np.float32)                       # (Hkv, c, d)
        self.ptr = np.zeros((hkv, c + 1), np.int64)
        self.list_ids = np.zeros((hkv, n), np.int64)
        for h in range(hkv if n else 0):
            cent, assign = self._impl.kmeans(self._ikeys[h], c, cfg.iters)
            self.centroids[h] = cent
            self.ptr[h], self.list_ids[h] = self._impl.ivf_lists(assign, c)

    def search(self, q, k=None, nprobe=None):
        """As :meth:`SparseIndex.search`, with an optional ``nprobe`` for this call (a recall sweep)."""
        return self._search_with(q, k, nprobe=nprobe)

    def _search(self, q3, k, nprobe=None):
        nprobe = self.nprobe if nprobe is None else min(self.n_lists, check_int(nprobe, "nprobe", 1))
        ids, scanned = self._impl.ivf_search(q3, self._ikeys, self.centroids, self.ptr, self.list_ids, nprobe, k)
        return ids, scanned, q3.shape[0] * self.n_lists


class QuestIndex(SparseIndex):
    """Quest: page min/max bounds; attend reads every token of the ``token_budget / page_size`` best pages."""

    CONFIG = QuestConfig

    def _setup(self, prefill_queries):
        cfg = self.config
        self.kmin, self.kmax = self._impl.quest_metadata(self._ikeys, cfg.page_size)   # (Hkv, P, d) each
        self.n_pages = max(1, cfg.token_budget // cfg.page_size)

    def search(self, q, k=None, n_pages=None):
        """Top-``k`` keys inside the ``n_pages`` best pages (default ``token_budget / page_size``)."""
        return self._search_with(q, k, n_pages=n_pages)

    def _search(self, q3, k, n_pages=None):
        n_pages = self.n_pages if n_pages is None else check_int(n_pages, "n_pages", 1)
        _, ids, scanned = self._impl.quest_search(q3, self._ikeys, self.kmin, self.kmax, self.config.page_size,
                                                  n_pages, k)
        return ids, scanned, 2 * q3.shape[0] * self.kmin.shape[1]

    def _retrieve(self, q3):
        hq, n_p = q3.shape[0], self.kmin.shape[1]
        bounds = self._impl.quest_bounds(q3, self.kmin, self.kmax)                  # (Hq, 1, P)
        pages = self._impl.select_topk(bounds.reshape(hq, n_p), min(self.n_pages, n_p))[:, None]  # (Hq, 1, n_pages)
        ps, n = self.config.page_size, self.n_indexed
        ids = (pages[:, :, :, None] * ps + np.arange(ps)).reshape(q3.shape[0], 1, -1)
        ids = np.where(ids < n, ids, -1)
        return ids, np.zeros((q3.shape[0], 1), np.int64), 2 * q3.shape[0] * self.kmin.shape[1]
