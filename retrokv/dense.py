"""Full attention as a decode index (``method="full"``): the ceiling every sparse method is judged against.

Every token is read exactly at every step. ``bytes_read`` counts each KV head's keys and values
once per step (``4 (d + dv)`` bytes a token; the heads of a GQA group share the read).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _validate as V
from ._xp import resolve_device, to_device, xp
from .backend import impl, resolve
from .index import IndexStats, check_prefill_queries, resolve_config

__all__ = ["DenseConfig", "DenseIndex"]


@dataclass(frozen=True)
class DenseConfig:
    """Full attention has no settings; the class exists so that every method has a config."""


class DenseIndex:
    """Exact attention over the whole KV cache, with the decode-index interface.

    Each KV head keeps its own growable ``(capacity, d)`` buffer, so the first ``n`` rows are one
    contiguous block the attention kernel reads in place (no per-step copy).
    """

    def __init__(self, keys, values, config, backend, device="cpu"):
        self.config, self.backend, self.device = config, resolve(backend), device
        self._core = impl(self.backend, "attention", device)
        keys, values = to_device(keys, device, "keys"), to_device(values, device, "values")
        m = xp(keys)                                    # the buffers live where the KV lives
        hkv, n, d = keys.shape
        cap = max(16, 2 * n)
        self._k = [m.empty((cap, d), np.float32) for _ in range(hkv)]
        self._v = [m.empty((cap, values.shape[2]), np.float32) for _ in range(hkv)]
        for h in range(hkv):
            self._k[h][:n], self._v[h][:n] = keys[h], values[h]
        self._n = n
        self.last_stats = None

    @classmethod
    def build(cls, keys, values, prefill_queries=None, *, config=None, backend=None, device=None, **overrides):
        """Hold ``keys (Hkv, N, d)`` and ``values (Hkv, N, dv)`` (copied); ``prefill_queries`` is unused.

        ``device``: ``None`` (infer: CuPy input means ``"cuda"``), ``"cpu"`` or ``"cuda"`` (``backend="fast"``:
        the KV stays in device memory and the split-K flash-decoding kernel of
        :mod:`retrokv.fast.cuda.attention` reads it)."""
        check_prefill_queries(prefill_queries, "DenseIndex")
        config = resolve_config(DenseConfig, config, overrides)
        device = resolve_device(device, keys, values)
        impl(resolve(backend), "attention", device)    # refuses device='cuda' with the reference backend
        keys, values = V.check_kv(keys, values)
        return cls(keys, values, config, backend, device)

    @property
    def n_tokens(self):
        return self._n

    @property
    def shape(self):
        """``(Hkv, d, dv)``."""
        return len(self._k), self._k[0].shape[1], self._v[0].shape[1]

    def append(self, k, v):
        """Add generated tokens ``(Hkv, d)`` or ``(Hkv, n, d)``."""
        hkv, d, dv = self.shape
        k, v = V.check_append(k, v, hkv, d, dv)
        k, v = to_device(k, self.device, "k"), to_device(v, self.device, "v")
        m = xp(self._k[0])
        for t in range(k.shape[1]):
            n = self._n
            for h in range(hkv):
                if n == self._k[h].shape[0]:
                    self._k[h] = m.concatenate([self._k[h], m.empty_like(self._k[h])])
                    self._v[h] = m.concatenate([self._v[h], m.empty_like(self._v[h])])
                self._k[h][n], self._v[h][n] = k[h, t], v[h, t]
            self._n = n + 1

    def attend(self, q, return_lse=False):
        """``q (Hq, d) -> (Hq, dv)`` over every token (and ``lse (Hq,)`` with ``return_lse``)."""
        return_lse = V.check_bool(return_lse, "return_lse")
        hkv, d, dv = self.shape
        q = V.as_array(q, "q")
        if q.ndim != 2 or q.shape[1] != d or q.shape[0] == 0 or q.shape[0] % hkv:
            raise ValueError(f"q must have shape (Hq, {d}) with Hq a positive multiple of Hkv={hkv}, "
                             f"got shape {tuple(q.shape)}")
        V.check_finite(q, "q")
        q = to_device(q, self.device, "q")
        m = xp(q)
        q = m.ascontiguousarray(q, dtype=np.float32)
        n, hq = self._n, q.shape[0]
        g = hq // hkv
        parts = [self._core.partial_attention(q[h * g:(h + 1) * g], self._k[h][None, :n], self._v[h][None, :n])
                 for h in range(hkv)]
        out = m.concatenate([p[0] for p in parts])
        lse = m.concatenate([p[1] for p in parts])
        self.last_stats = IndexStats(n_tokens=n, tokens_attended=hq * n, keys_scored=0, meta_scored=0,
                                     bytes_read=4 * hkv * n * (d + dv), density=1.0)
        return (out, lse) if return_lse else out

    def __repr__(self):
        hkv, d, dv = self.shape
        return f"DenseIndex(Hkv={hkv}, d={d}, dv={dv}, tokens={self._n}, backend={self.backend!r}, device={self.device!r})"
