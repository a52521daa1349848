"""Attention as retrieval: full attention, partial attention with its log-sum-exp, and the LSE merge.

This is the NumPy reference. Every sparse method in retrokv splits the keys into disjoint sets
(a static window, retrieved keys, estimated clusters, ...), attends to each set separately and merges
the partial results. The merge is exact because softmax attention over a union of disjoint sets is a
convex combination of the per-set attentions, weighted by each set's share of the exp-mass:

    o = sum_i exp(lse_i - lse) * o_i,    lse = log sum_i exp(lse_i)

(RetrievalAttention, Appendix B; RetroInfer's weighted flash-decoding uses the same identity.)

Shapes (DESIGN.md): queries ``(Hq, d)`` for one decode step or ``(Hq, T, d)`` for a block of T
queries; keys and values ``(Hkv, N, d)``. Query head ``h`` reads KV head ``h // G`` with ``G = Hq // Hkv``
(grouped-query attention). Everything is computed in float32.
"""
from __future__ import annotations

import numpy as np

__all__ = ["full_attention", "partial_attention", "merge_partials"]


def _as_blocks(q, k):
    """View q as (Hkv, G, T, d) so that a single matmul serves a whole GQA group."""
    decode = q.ndim == 2
    q4 = q[:, None, :] if decode else q                      # (Hq, T, d)
    hq, t, d = q4.shape
    hkv = k.shape[0]
    return q4.reshape(hkv, hq // hkv, t, d), decode


def partial_attention(q, k, v, causal=False, scale=None):
    """Softmax attention of ``q`` over the keys ``k`` and values ``v``, with its log-sum-exp.

    Returns ``(out, lse)`` where ``out`` has ``q``'s shape (with ``v``'s last dimension) and
    ``lse = log sum_j exp(s_j)`` over the scaled scores ``s_j = q.k_j * scale`` has ``q``'s shape
    without its last axis. An empty key set gives ``out = 0`` and ``lse = -inf``, the identity of
    :func:`merge_partials`.

    With ``causal=True`` and a query block ``(Hq, T, d)``, the T queries sit at the last T key
    positions: query ``t`` sees keys ``0 .. N - T + t``. A single decode query sees every key.
    """
    q = np.asarray(q, dtype=np.float32)
    k = np.asarray(k, dtype=np.float32)
    v = np.asarray(v, dtype=np.float32)
    d = q.shape[-1]
    scale = np.float32(1.0 / np.sqrt(d) if scale is None else scale)
    qb, decode = _as_blocks(q, k)                               # (Hkv, G, T, d)
    hkv, g, t, _ = qb.shape
    n = k.shape[1]

    # scores[h, g, t, j] = q . k_j for the KV head h that query head (h, g) reads
    with np.errstate(invalid="ignore", over="ignore"):   # NaN/inf inputs (check_finite=False) propagate quietly
        scores = (qb.reshape(hkv, g * t, d) @ k.transpose(0, 2, 1)).reshape(hkv, g, t, n) * scale  # (Hkv, G, T, N)
    if causal and not decode:
        # query t may read keys up to N - T + t (queries are the last T positions)
        allowed = np.arange(n)[None, :] <= (n - t + np.arange(t))[:, None]   # (T, N)
        scores = np.where(allowed, scores, -np.inf)

    m = scores.max(axis=-1, keepdims=True) if n else np.full(scores.shape[:-1] + (1,), -np.inf, np.float32)
    m_safe = np.where(np.isfinite(m), m, 0.0).astype(np.float32)  # a row with no keys keeps exp() at 0
    p = np.exp(scores - m_safe)                                   # (Hkv, G, T, N)
    denom = p.sum(axis=-1, keepdims=True)                          # (Hkv, G, T, 1)
    dv = v.shape[-1]
    num = (p.reshape(hkv, g * t, n) @ v).reshape(hkv, g, t, dv)    # (Hkv, G, T, dv); explicit dv: G or T may be 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # only a row with no visible key (denom exactly 0) is (0, -inf); a NaN denominator (NaN in the
        # inputs, check_finite=False) must stay NaN, as in the fast path, not turn into a clean 0
        out = np.where(denom == 0, 0.0, num / denom).astype(np.float32)
        lse = (np.log(denom) + m_safe)[..., 0].astype(np.float32)  # log(0) = -inf for empty rows

    out = out.reshape(hkv * g, t, dv)
    lse = lse.reshape(hkv * g, t)
    if decode:
        return out[:, 0], lse[:, 0]
    return out, lse


def full_attention(q, k, v, causal=False, scale=None):
    """Exact softmax attention ``softmax(q k^T * scale) v`` with GQA; the output of :func:`partial_attention`."""
    return partial_attention(q, k, v, causal=causal, scale=scale)[0]


def merge_partials(parts):
    """Merge partial attentions over disjoint key sets into the attention over their union.

    ``parts`` is a sequence of ``(out, lse)`` pairs with equal shapes. Implements the log-sum-exp
    rescaling of RetrievalAttention Appendix B: ``lse = logsumexp_i lse_i`` and
    ``out = sum_i exp(lse_i - lse) * out_i``. Parts with ``lse = -inf`` (empty sets) contribute nothing;
    if every part is empty the result is ``(0, -inf)``.
    """
    outs = np.stack([np.asarray(o, dtype=np.float32) for o, _ in parts])     # (P, ..., dv)
    lses = np.stack([np.asarray(l, dtype=np.float32) for _, l in parts])     # (P, ...)
    m = lses.max(axis=0)                                                      # (...)
    m_safe = np.where(np.isfinite(m), m, 0.0).astype(np.float32)
    w = np.exp(lses - m_safe)                                                 # (P, ...): 0 for empty parts
    total = w.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # total is 0 only when every part is empty; NaN (NaN inputs) propagates as in the fast path
        out = np.where(total[..., None] == 0, 0.0, (w[..., None] * outs).sum(axis=0) / total[..., None])
        lse = np.log(total) + m_safe
    return out.astype(np.float32), lse.astype(np.float32)
