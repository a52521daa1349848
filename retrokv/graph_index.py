"""RetrievalAttention (arXiv 2409.10516): the attention-aware graph index, as a decode-time KV index.

::

    graph = GraphIndex.build(keys, values, prefill_queries, config=GraphConfig(), backend="fast")
    ids, n_scanned = graph.search(q, k=100)     # (Hq, k) token positions, keys scored per head
    out = graph.attend(q)                       # static tokens + top-k retrieved, merged by LSE
    graph.append(k, v)                          # generated tokens join the static window

One graph per query head (RA §3.2: the heads of a GQA group have different query distributions)
over the keys its KV head shares with the group. The first ``n_sink`` and last ``n_recent`` prompt
tokens are static (attended exactly, RA §3.3: 128 + 512) and not indexed. Algorithms:
:mod:`retrokv.reference.graph_index` (readable) and :mod:`retrokv.fast.graph_index` (Numba).
With ``device="cuda"`` (``backend="fast"``) the index runs the paper's CPU-GPU co-execution (§3.3): graph
and indexed KV in host memory, static tokens attended on the GPU, the partials merged by log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _validate as V
from .sparse import SparseIndex, check_int, check_kv

__all__ = ["GraphConfig", "GraphIndex"]


@dataclass(frozen=True)
class GraphConfig:
    """Parameters of the graph index. Paper defaults where given, RoarGraph's otherwise.

    Attributes:
        n_sink, n_recent: static tokens, attended exactly (RA §3.3: 128 initial + 512 recent).
        top_k: keys retrieved per head at decode (RA §4: 100).
        n_query_neighbors: nearest keys per prefill query used by the projection (RoarGraph: 100); exact
            in the reference, an IVF scan of 10% of the keys in the fast build above 2048 keys
            (docs/graph_index.md).
        max_degree: out-degree bound M (RoarGraph: 35).
        pool_cap: candidates considered per target before pruning (RoarGraph's build list L: 500).
        search_L: candidate-list length of the beam search (at least ``top_k``); longer contexts need
            a longer list for the same recall (measured in docs/graph_index.md).
        metric: distance between keys in the occlusion pruning, ``"l2"`` (Euclidean) or ``"ip"``
            (negative inner product, RoarGraph's choice for inner-product data). ``"l2"`` reached
            recall@100 = 0.95 with fewer keys scored on SmolLM2 Q/K (docs/graph_index.md).
        enhance: add nearest-key edges to free slots (RoarGraph's connectivity enhancement).
        build_queries: use at most this many prefill queries (evenly strided, always including the
            last) for the projection; ``None`` uses all, as the paper does. The k-NN of every
            prefill query dominates the build time (benchmarks/results/graph_build.md).
    """
    n_sink: int = 128
    n_recent: int = 512
    top_k: int = 100
    n_query_neighbors: int = 100
    max_degree: int = 35
    pool_cap: int = 500
    search_L: int = 150
    metric: str = "l2"
    enhance: bool = True
    build_queries: int | None = None

    def __post_init__(self):
        if self.build_queries is not None:
            check_int(self.build_queries, "GraphConfig.build_queries", 1)
        for name in ("top_k", "n_query_neighbors", "max_degree", "pool_cap", "search_L"):
            check_int(getattr(self, name), f"GraphConfig.{name}", 1)
        for name in ("n_sink", "n_recent"):
            check_int(getattr(self, name), f"GraphConfig.{name}", 0)
        if self.n_query_neighbors < 2:
            raise ValueError(f"GraphConfig.n_query_neighbors must be >= 2 (a target and a candidate), "
                             f"got {self.n_query_neighbors}")
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"GraphConfig.metric must be 'ip' or 'l2', got {self.metric!r}")
        object.__setattr__(self, "enhance", V.check_bool(self.enhance, "GraphConfig.enhance"))


class GraphIndex(SparseIndex):
    """RetrievalAttention's index for one layer: ``adj (Hq, n, M)`` graphs over the indexed keys.

    Attributes: ``adj`` (``-1``-padded out-neighbours, local ids), ``entry (Hq,)``, ``config``,
    ``lo``/``hi`` (indexed positions ``[lo, hi)``), ``last_stats`` (see :mod:`retrokv.sparse`).
    """

    _IMPL = "graph_index"

    @classmethod
    def _check_device(cls, device):
        """``device="cuda"`` is RetrievalAttention's CPU-GPU co-execution (arXiv 2409.10516, §3.3): the graph,
        the indexed KV and the search stay in host memory on the CPU (the indexed KV is copied there once,
        at build, as the paper offloads it); the static tokens (sinks + window + generated) live on the
        device and are attended there by the CUDA kernel while the CPU searches, and the two partials
        are merged by log-sum-exp on the device (:func:`retrokv.fast.cuda.graph_index.co_attention`)."""
        return device

    CONFIG = GraphConfig

    def _setup(self, prefill_queries):
        """Build one graph per query head from ``prefill_queries (Hq, Tq, d)`` (required: RA §3.2)."""
        config, (hkv, _, d) = self.config, self._ikeys.shape
        if prefill_queries is None:
            raise TypeError("GraphIndex.build needs prefill_queries (Hq, Tq, d): RetrievalAttention builds "
                            "its graph from the prefill queries' nearest keys")
        pq = V.as_array(prefill_queries, "prefill_queries")
        V.check_rank(pq, "prefill_queries", (3,), "(Hq, Tq, d)")
        if pq.shape[2] != d or pq.shape[0] == 0 or pq.shape[0] % hkv:
            raise ValueError(f"prefill_queries must have shape (Hq, Tq, {d}) with Hq a positive multiple of "
                             f"Hkv={hkv}, got {tuple(pq.shape)}")
        V.check_finite(pq, "prefill_queries")
        if config.build_queries is not None and pq.shape[1] > config.build_queries:
            keep = np.linspace(0, pq.shape[1] - 1, config.build_queries).round().astype(np.int64)
            pq = pq[:, np.unique(keep)]
        pq = np.ascontiguousarray(pq, dtype=np.float32)
        hq, m = pq.shape[0], config.max_degree
        g = hq // hkv
        n = self.n_indexed
        self.adj = np.full((hq, n, m), -1, dtype=np.int64)                      # (Hq, n, M)
        self.entry = np.zeros(hq, dtype=np.int64)
        impl = self._impl
        for kv in range(hkv if n else 0):
            knbrs = impl.key_neighbors(self._ikeys[kv], m)                       # shared by the group
            for h in range(kv * g, (kv + 1) * g):
                self.adj[h], self.entry[h] = impl.build_graph(
                    pq[h], self._ikeys[kv], config.n_query_neighbors, m, config.pool_cap, config.metric,
                    enhance_edges=config.enhance, knbrs=knbrs)

    @property
    def n_query_heads(self):
        return self.adj.shape[0]

    def degrees(self):
        """Out-degree of every node of every head's graph: ``(Hq, n)``."""
        return (self.adj >= 0).sum(-1)

    def search(self, q, k=None, L=None):
        """Greedy beam search (RA §3.3) with candidate list ``L`` (default ``config.search_L``) for this call.

        ``q (Hq, d)`` or ``(Hq, B, d)``; returns ``(ids, n_scanned)`` as :meth:`SparseIndex.search`.
        """
        return self._search_with(q, k, L=L)

    def _search(self, q3, k, L=None):
        L = self.config.search_L if L is None else check_int(L, "L", 1)
        if q3.shape[0] != self.n_query_heads:
            raise ValueError(f"q has {q3.shape[0]} heads but the index was built with {self.n_query_heads} "
                             "query heads (one graph per query head)")
        ids, scanned = self._impl.graph_search(q3, self._ikeys, self.adj, self.entry, k, max(L, k))
        return ids, scanned, 0
