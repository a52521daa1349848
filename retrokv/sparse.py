"""Shared machinery of every retrieval index: static tokens + retrieved tokens, merged by log-sum-exp.

RetrievalAttention §3.3 (and App. B) splits the context of one decode step into two disjoint sets:
the *static* tokens W (the first ``n_sink`` tokens, the last ``n_recent`` tokens of the prompt, and
every generated token), attended exactly, and the tokens Omega retrieved from an index over the rest,
also attended exactly. The two partial attentions are merged by their log-sum-exp. Every index in
retrokv (GraphIndex, IVFIndex, QuestIndex, TopKOracle) differs only in how it picks Omega; this base
class owns the rest: storage, ``append``, ``attend`` and ``last_stats`` (an :class:`~retrokv.index.IndexStats`).

Cost accounting in ``last_stats`` (per decode step, summed over query heads, as if each query head
read its own copy: an upper bound on what a GQA group sharing reads would move):

* ``keys_scored``: keys whose inner product with the query was computed to choose Omega;
* ``meta_scored``: other vectors scored to choose Omega (IVF centroids, Quest page min/max pairs);
* ``tokens_attended``: tokens whose K and V entered exact attention (|W| + |Omega| per head);
* ``bytes_read``: ``4 d`` bytes per scored vector (a Quest page counts two) + ``4 (d + dv)`` per
  attended token (K and V in float32);
* ``density``: ``tokens_attended / (Hq * n_tokens)``.
"""
from __future__ import annotations

import numpy as np

from . import _validate as V
from ._validate import check_int, check_kv  # noqa: F401  (the subclasses' validators)
from ._xp import resolve_device, to_device, to_host, xp
from .backend import impl, resolve
from .index import IndexStats, check_prefill_queries, resolve_config


class SparseIndex:
    """Base of the retrieval indexes: static window W exact, retrieved set Omega exact, LSE merge.

    Subclasses set ``_IMPL`` (the module name under ``retrokv.reference`` / ``retrokv.fast``) and
    implement ``_search(q (Hq, B, d), k) -> (local ids (Hq, B, k) padded with -1, n_scanned (Hq, B),
    meta_scored)`` over ``self._ikeys``, the indexed keys ``(Hkv, n, d)``.
    """

    _IMPL = "baselines"
    CONFIG = None            # the config dataclass of the method (fields n_sink, n_recent, maybe top_k)

    @classmethod
    def build(cls, keys, values, prefill_queries=None, *, config=None, backend=None, device=None, **overrides):
        """Index one layer's ``keys``/``values (Hkv, N, d)`` (copied: the index owns its KV).

        ``config`` fields may be overridden by keyword (``IVFIndex.build(k, v, nprobe=8)``);
        ``prefill_queries (Hq, T, d)`` is used only by the methods that learn from them (the graph).
        ``device``: ``None`` (infer from the arrays), ``"cpu"`` or ``"cuda"``; the baselines run on the CPU
        only, :class:`~retrokv.graph_index.GraphIndex` also on the GPU (see its ``_check_device``).
        """
        check_prefill_queries(prefill_queries, cls.__name__)
        device = cls._check_device(resolve_device(device, keys, values))
        if device == "cuda":
            impl(resolve(backend), "attention", device)     # device='cuda' needs backend='fast': say so first
        cfg = resolve_config(cls.CONFIG, config, overrides)
        keys, values = check_kv(keys, values)
        # a GPU index (GraphIndex only) keeps the indexed KV in host memory, as RetrievalAttention offloads it
        self = cls(to_host(keys), to_host(values), cfg.n_sink, cfg.n_recent, getattr(cfg, "top_k", 1), backend)
        self.config = cfg
        self._setup(to_host(V.as_array(prefill_queries, "prefill_queries"))
                    if prefill_queries is not None and device == "cuda" else prefill_queries)
        self.device = device
        if device == "cuda":                            # only the static tokens move to the device
            self._sk, self._sv = to_device(self._sk, device), to_device(self._sv, device)
        return self

    @classmethod
    def _check_device(cls, device):
        """Refuse ``device="cuda"``: the public classes of these methods have no GPU path yet, and the
        public layer never copies device arrays to the host silently (DESIGN.md, the backend contract)."""
        if device == "cuda":
            raise ValueError(f"{cls.__name__}.build got device='cuda' (or CuPy arrays), but {cls.__name__} runs "
                             "on the CPU only in this version; pass NumPy arrays with device='cpu' "
                             "(cupy.asnumpy), or use WaveIndex / DenseIndex / GraphIndex, which run on the GPU")
        return device

    def _setup(self, prefill_queries):
        """The one hook of a method: build its search structure over ``self._ikeys`` (default: none)."""

    def __init__(self, keys, values, n_sink, n_recent, top_k, backend):
        self.backend, self.device = resolve(backend), "cpu"
        self._core = impl(self.backend, "attention")
        self._impl = impl(self.backend, self._IMPL)
        hkv, n, d = keys.shape
        self.top_k = top_k
        s = min(n_sink, n)
        r = min(n_recent, n - s)
        self.lo, self.hi = s, n - r                     # indexed tokens: positions [lo, hi)
        self._ikeys = np.ascontiguousarray(keys[:, self.lo:self.hi])        # (Hkv, n_idx, d)
        self._ivalues = np.ascontiguousarray(values[:, self.lo:self.hi])    # (Hkv, n_idx, dv)
        # static tokens W, in a buffer with spare room so that append is amortised O(1)
        sk = np.concatenate([keys[:, :self.lo], keys[:, self.hi:]], axis=1)  # (Hkv, S, d)
        sv = np.concatenate([values[:, :self.lo], values[:, self.hi:]], axis=1)
        self._ns = sk.shape[1]
        self._sk = np.empty((hkv, max(16, 2 * self._ns), d), np.float32)
        self._sv = np.empty((hkv, self._sk.shape[1], values.shape[2]), np.float32)
        self._sk[:, :self._ns], self._sv[:, :self._ns] = sk, sv
        self._static_pos = np.concatenate([np.arange(self.lo), np.arange(self.hi, n)]).astype(np.int64)
        self._n = n
        self.last_stats = None

    # ------------------------------------------------------------------ properties
    @property
    def n_tokens(self):
        """Tokens held: the prompt plus every appended token."""
        return self._n

    @property
    def n_kv_heads(self):
        return self._sk.shape[0]

    @property
    def head_dim(self):
        return self._sk.shape[2]

    @property
    def n_indexed(self):
        return self._ikeys.shape[1]

    @property
    def static_positions(self):
        """Positions of the static tokens W (sink, recent, generated), ascending."""
        return self._static_pos.copy()

    # ------------------------------------------------------------------ public API
    def append(self, k, v):
        """Add generated tokens (``k``, ``v``: ``(Hkv, d)`` or ``(Hkv, n, d)``); they join the static window (RA §3.3)."""
        k, v = V.check_append(k, v, self.n_kv_heads, self.head_dim, self._sv.shape[2])
        k, v = to_device(k, self.device, "k"), to_device(v, self.device, "v")
        for t in range(k.shape[1]):
            self._append_one(k[:, t], v[:, t])

    def _append_one(self, k, v):
        if self._ns == self._sk.shape[1]:               # grow by doubling
            m = xp(self._sk)                            # the static tokens live on the index's device
            self._sk = m.concatenate([self._sk, m.empty_like(self._sk)], axis=1)
            self._sv = m.concatenate([self._sv, m.empty_like(self._sv)], axis=1)
        self._sk[:, self._ns], self._sv[:, self._ns] = k, v
        self._ns += 1
        self._static_pos = np.append(self._static_pos, self._n)
        self._n += 1

    def search(self, q, k=None):
        """Top-``k`` retrieval over the indexed tokens (not the static ones).

        ``q``: ``(Hq, d)`` or a batch ``(Hq, B, d)``. Returns ``(ids, n_scanned)``: token positions
        ``(Hq, k)`` / ``(Hq, B, k)`` int64, best first, padded with ``-1`` when fewer keys were
        reached, and the number of keys scored per query ``(Hq,)`` / ``(Hq, B)``.
        """
        return self._search_with(q, k)

    def _search_with(self, q, k, **settings):
        """:meth:`search` with per-call search settings passed to ``_search`` (the index is not mutated)."""
        k = self.top_k if k is None else check_int(k, "k", 1)
        q3, single = self._check_q(q, batch=True)
        ids, scanned, _ = self._search(to_host(q3), k, **settings)     # the search runs on the CPU
        ids = np.where(ids >= 0, ids + self.lo, -1)
        return (ids[:, 0], scanned[:, 0]) if single else (ids, scanned)

    def attend(self, q, return_lse=False):
        """Sparse attention for one decode step: exact over W and over the top-k retrieved, LSE-merged.

        ``q (Hq, d)`` -> ``(Hq, dv)`` (and ``lse (Hq,)`` with ``return_lse=True``). Fills ``last_stats``.
        """
        return_lse = V.check_bool(return_lse, "return_lse")
        q3, _ = self._check_q(q, batch=False)
        q2 = q3[:, 0]
        found = {}

        def retrieved_partial(q_host):                  # Omega: search + exact attention, on the CPU
            ids, scanned, meta = self._retrieve(np.ascontiguousarray(q_host[:, None])) if self.n_indexed else (
                np.full((q_host.shape[0], 1, 0), -1, np.int64), np.zeros((q_host.shape[0], 1), np.int64), 0)
            found.update(scanned=scanned[:, 0], meta=meta, n=int((ids >= 0).sum()))
            return self._attend_ids(q_host, ids[:, 0])
        if self.device == "cuda":
            out, lse = self._co_attention(q2, retrieved_partial)
        else:
            static = self._core.partial_attention(q2, self._sk[:, :self._ns], self._sv[:, :self._ns])
            out, lse = self._core.merge_partials([static, retrieved_partial(q2)])
        self._record(q2.shape[0], found["scanned"], found["meta"], self._ns * q2.shape[0], found["n"])
        return (out, lse) if return_lse else out

    def _co_attention(self, q2, retrieved_partial):
        """The GPU step of RetrievalAttention's co-execution (§3.3): the static tokens on the device, Omega
        on the CPU, merged by log-sum-exp (:func:`retrokv.fast.cuda.graph_index.co_attention`)."""
        co = impl(self.backend, "graph_index", "cuda").co_attention
        return co(q2, self._sk[:, :self._ns], self._sv[:, :self._ns], retrieved_partial)

    # ------------------------------------------------------------------ helpers
    def _check_q(self, q, batch):
        q = V.as_array(q, "q")
        ranks = (2, 3) if batch else (2,)
        V.check_rank(q, "q", ranks, "(Hq, d) or (Hq, B, d)" if batch else "(Hq, d)")
        if q.shape[-1] != self.head_dim or q.shape[0] % self.n_kv_heads or q.shape[0] == 0:
            raise ValueError(f"q must have shape (Hq, d) with d={self.head_dim} and Hq a positive multiple of "
                             f"Hkv={self.n_kv_heads}, got {tuple(q.shape)}")
        V.check_finite(q, "q")
        single = q.ndim == 2
        q = to_device(q, self.device, "q")
        q3 = xp(q).ascontiguousarray(q[:, None] if single else q, dtype=np.float32)
        return q3, single

    def _retrieve(self, q3):
        """The set Omega for ``attend``: by default the top-k of :meth:`search` (Quest reads whole pages)."""
        return self._search(q3, self.top_k)

    def _attend_ids(self, q, ids):
        """Exact partial attention of each query head over its own retrieved keys ``ids (Hq, k)``."""
        hq = q.shape[0]
        g = hq // self.n_kv_heads
        kv = np.arange(hq) // g
        valid = ids >= 0
        if valid.all():
            kg = self._ikeys[kv[:, None], ids]                      # (Hq, k, d): each head is its own "KV head"
            vg = self._ivalues[kv[:, None], ids]
            return self._core.partial_attention(q, kg, vg)
        out = np.zeros((hq, self._ivalues.shape[2]), np.float32)
        lse = np.full(hq, -np.inf, np.float32)
        for h in range(hq):
            sel = ids[h][valid[h]]
            if len(sel):
                o, l = self._core.partial_attention(q[h:h + 1], self._ikeys[kv[h]][None, sel], self._ivalues[kv[h]][None, sel])
                out[h], lse[h] = o[0], l[0]
        return out, lse

    def _record(self, hq, scanned, meta, static, retrieved):
        d = self.head_dim
        keys_scored = int(np.sum(scanned))
        attended = static + retrieved
        self.last_stats = IndexStats(
            n_tokens=self._n, tokens_attended=attended, keys_scored=keys_scored, meta_scored=int(meta),
            bytes_read=4 * d * (keys_scored + int(meta)) + 4 * (d + self._sv.shape[2]) * attended,
            density=attended / max(1, hq * self._n), zones={"static": static, "retrieved": retrieved})
