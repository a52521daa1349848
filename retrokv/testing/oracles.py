"""Trusted outputs to compare a kernel with: float64 full attention, and each retrokv method's reference.

Two kinds of truth:

* :func:`attention_oracle` is softmax attention computed in float64, written the plain way
  (scores, max-subtracted exponentials, one division), with its log-sum-exp. Every exact kernel
  (FlashAttention-style, SDPA, a paged-KV decode kernel) should agree with it up to its own
  precision; :func:`retrokv.testing.assert_attention_close` does the judging.
* ``wave_reference``, ``topk_reference``, ``streaming_reference``, ``quest_reference``,
  ``ivf_reference``, ``graph_reference`` and ``lazy_reference`` run retrokv's readable NumPy
  implementation (``backend="reference"``) of one sparse method on the same inputs, so a
  re-implementation of RetroInfer's tripartite attention, Quest or a RetrievalAttention index can be
  compared with ours, not only with full attention (which a sparse method only approximates).

Shapes follow retrokv's conventions: queries ``(Hq, d)`` (one decode step) or ``(Hq, T, d)``, keys and
values ``(Hkv, N, d)``, query head ``h`` reads KV head ``h // (Hq // Hkv)``. Any NumPy, torch or CuPy
array is accepted. Every function returns ``(out, lse)`` as NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from ._arrays import to_numpy

__all__ = ["attention_oracle", "wave_reference", "topk_reference", "streaming_reference",
           "quest_reference", "ivf_reference", "graph_reference", "lazy_reference", "logical_keys",
           "method_reference", "METHODS"]


def _check_shapes(q, k, v):
    if q.ndim not in (2, 3):
        raise ValueError(f"q must have shape (Hq, d) or (Hq, T, d), got {q.shape}")
    if k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must have shapes (Hkv, N, d) and (Hkv, N, dv), got {k.shape} and {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q's head_dim {q.shape[-1]} differs from k's {k.shape[-1]}")
    if k.shape[0] == 0 or q.shape[0] % k.shape[0]:
        raise ValueError(f"q's {q.shape[0]} heads must be a positive multiple of k's {k.shape[0]} KV heads")


def attention_oracle(q, k, v, causal=False, scale=None):
    """Softmax attention in float64 with grouped-query heads: returns ``(out, lse)``.

    ``out = softmax(q k^T * scale) v`` and ``lse = log sum_j exp(q.k_j * scale)``; ``scale`` defaults
    to ``1 / sqrt(d)``. With ``causal=True`` and a block ``q (Hq, T, d)`` the T queries are the last T
    positions: query ``t`` sees keys ``0 .. N - T + t`` (bottom-right alignment, as a prefill chunk
    appended to a cache; note that torch's ``is_causal`` aligns top-left instead). A row that sees no
    key (``N = 0``) has ``out = 0`` and ``lse = -inf``, the identity of the log-sum-exp merge
    (RetrievalAttention App. B).

    The maximum is subtracted before ``exp``, so scores of any magnitude that float64 can hold are
    fine. Memory is ``Hq * T * N`` float64 values: this is an oracle for tests, not a kernel.
    """
    return _oracle(q, k, v, causal, scale)[:2]


def _oracle(q, k, v, causal, scale):
    """:func:`attention_oracle`, plus the largest ``scale * sum_i |q_i k_i|`` among the keys that carry
    weight (``exp(s - max) > 1e-12``): a float32 dot product is off by a few eps32 times that much."""
    q, k, v = to_numpy(q, "q"), to_numpy(k, "k"), to_numpy(v, "v")         # float64 copies
    _check_shapes(q, k, v)
    decode = q.ndim == 2
    q3 = q[:, None] if decode else q                                         # (Hq, T, d)
    hq, t, d = q3.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    s = np.einsum("hgtd,hnd->hgtn", q3.reshape(hkv, g, t, d), k) * scale     # (Hkv, G, T, N)
    if causal and not decode:
        allowed = np.arange(n)[None, :] <= (n - t + np.arange(t))[:, None]   # (T, N)
        s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if n else np.full(s.shape[:-1] + (1,), -np.inf)
    m = np.where(np.isfinite(m), m, 0.0)                                     # rows with no key keep exp() = 0
    p = np.exp(s - m)                                                        # (Hkv, G, T, N)
    den = p.sum(axis=-1)                                                     # (Hkv, G, T)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den[..., None] > 0, np.einsum("hgtn,hnd->hgtd", p, v) / den[..., None], 0.0)
        lse = np.log(den) + m[..., 0]                                        # log 0 = -inf: empty row
    out = out.reshape(hq, t, v.shape[-1])
    lse = lse.reshape(hq, t)
    cond = np.einsum("hgtd,hnd->hgtn", np.abs(q3).reshape(hkv, g, t, d), np.abs(k)) * scale  # >= |s|
    s_weighty = float(np.where(p > 1e-12, cond, 0.0).max(initial=0.0))
    return ((out[:, 0], lse[:, 0]) if decode else (out, lse)) + (s_weighty,)


# ---------------------------------------------------------------------------------------------------
# retrokv's sparse methods, run by the NumPy reference backend

def _rk():
    import retrokv  # configs and indexes load lazily from the top-level names

    return retrokv


def _f32(x, name):
    return np.ascontiguousarray(to_numpy(x, name, np.float32))


def _decode_q(q):
    q = _f32(q, "q")
    if q.ndim != 2:
        raise ValueError(f"sparse methods attend one decode step: q must have shape (Hq, d), got {q.shape}")
    return q


def _attend(index, q, return_index):
    out, lse = index.attend(q, return_lse=True)
    return (out, lse, index) if return_index else (out, lse)


def wave_reference(q, k, v, config=None, *, return_index=False):
    """RetroInfer's tripartite attention (arXiv 2505.02922 §4.1, Eq. 2) for one decode query.

    Builds :class:`retrokv.WaveIndex` over ``k, v (Hkv, N, d)`` with ``config`` (a
    :class:`retrokv.WaveConfig`, default the paper's) and attends ``q (Hq, d)``: steady zone and
    retrieved clusters exact, estimation zone from centroids, the rest dropped. Returns
    ``(out (Hq, dv), lse (Hq,))``, plus the index (zones in ``index.last_stats``, clusters in
    ``index.meta``) with ``return_index=True``.
    """
    rk = _rk()
    index = rk.WaveIndex.build(_f32(k, "k"), _f32(v, "v"), config=config, backend="reference")
    return _attend(index, _decode_q(q), return_index)


def topk_reference(q, k, v, config=None, *, return_index=False):
    """Exact top-k attention ("Flat" in RetrievalAttention §4): static sink + recent tokens and the
    ``top_k`` best-scoring other keys per query head, merged by log-sum-exp. ``config``:
    :class:`retrokv.TopKConfig`. Returns ``(out, lse)`` as :func:`wave_reference`."""
    rk = _rk()
    index = rk.TopKOracle.build(_f32(k, "k"), _f32(v, "v"), config=config, backend="reference")
    return _attend(index, _decode_q(q), return_index)


def streaming_reference(q, k, v, config=None, *, return_index=False):
    """StreamingLLM (arXiv 2309.17453): ``n_sink`` first tokens + the last ``n_recent``.
    ``config``: :class:`retrokv.StreamingConfig`. Returns ``(out, lse)``."""
    rk = _rk()
    index = rk.StreamingLLM.build(_f32(k, "k"), _f32(v, "v"), config=config, backend="reference")
    return _attend(index, _decode_q(q), return_index)


def quest_reference(q, k, v, config=None, *, return_index=False):
    """Quest (arXiv 2406.10774): pages ranked by the element-wise min/max upper bound
    ``sum_i max(q_i m_i, q_i M_i)``, the best ``token_budget / page_size`` pages read exactly, plus the
    static tokens. ``config``: :class:`retrokv.QuestConfig`. Returns ``(out, lse)``."""
    rk = _rk()
    index = rk.QuestIndex.build(_f32(k, "k"), _f32(v, "v"), config=config, backend="reference")
    return _attend(index, _decode_q(q), return_index)


def ivf_reference(q, k, v, config=None, *, return_index=False):
    """IVF (inverted lists over k-means centroids, RetrievalAttention's baseline): the ``top_k`` best
    keys among the ``nprobe`` lists whose centroids score highest, plus the static tokens.
    ``config``: :class:`retrokv.IVFConfig`. Returns ``(out, lse)``."""
    rk = _rk()
    index = rk.IVFIndex.build(_f32(k, "k"), _f32(v, "v"), config=config, backend="reference")
    return _attend(index, _decode_q(q), return_index)


def graph_reference(q, k, v, prefill_queries, config=None, *, return_index=False):
    """RetrievalAttention (arXiv 2409.10516 §3): an attention-aware graph per query head, built from
    ``prefill_queries (Hq, Tq, d)``; the ``top_k`` keys found by greedy beam search plus the static
    tokens, merged by log-sum-exp (App. B). ``config``: :class:`retrokv.GraphConfig`. Returns
    ``(out, lse)``."""
    rk = _rk()
    index = rk.GraphIndex.build(_f32(k, "k"), _f32(v, "v"), _f32(prefill_queries, "prefill_queries"),
                                config=config, backend="reference")
    return _attend(index, _decode_q(q), return_index)


def _store(documents, config):
    rk = _rk()
    store = rk.DocumentStore(config, backend="reference")
    docs = []
    for i, (dk, dv) in enumerate(documents):
        dk, dv = _f32(dk, f"documents[{i}] keys"), _f32(dv, f"documents[{i}] values")
        if dk.ndim != 3 or dk.shape[1] == 0:
            raise ValueError(f"documents[{i}] keys must have shape (Hkv, L, d) with L >= 1, got {dk.shape}")
        docs.append(store.put(np.arange(dk.shape[1]), dk, dv, key=("retrokv.testing", i)))
    return store, docs


def lazy_reference(q, documents, k_tail, v_tail, *, start=0, config=None):
    """LazyAttention (arXiv 2606.04302 §3-4): attention over documents whose keys carry
    document-local RoPE, re-positioned on the fly.

    Args:
        q (array): ``(Hq, d)`` a decode query, or ``(Hq, T, d)`` the last T tail tokens (prefill: every
            document visible, causal over the tail); rotated to logical positions.
        documents (sequence): ``(keys, values)`` pairs, each ``(Hkv, L, d)``; keys rotated to positions
            ``0 .. L-1`` as if the document were prefilled alone.
        k_tail (array): ``(Hkv, M, d)`` keys of the tokens after the documents (logical positions), ``M >= T``.
        v_tail (array): ``(Hkv, M, dv)`` their values.
        start (int): logical position of the first document (e.g. after a preamble).
        config (LazyConfig | None): block size, RoPE ``theta`` and convention (default ``LazyConfig()``).

    Returns ``(out, lse)``. ``out`` is :class:`retrokv.DocumentStore`'s lazy attention; ``lse`` is that
    of the Block-Attention layout (:func:`logical_keys`), which is the same sum of exponentials.
    """
    store, docs = _store(documents, config)
    req = store.request(docs, start=start)
    q, kt, vt = _f32(q, "q"), _f32(k_tail, "k_tail"), _f32(v_tail, "v_tail")
    out = store.decode_attention(req, q, kt, vt) if q.ndim == 2 else store.prefill_attention(req, q, kt, vt)
    from retrokv.reference.attention import partial_attention

    k_all, v_all = logical_keys(documents, k_tail, v_tail, start=start, config=config)
    _, lse = partial_attention(q, k_all, v_all, causal=q.ndim == 3)
    return out, lse


def logical_keys(documents, k_tail, v_tail, *, start=0, config=None):
    """Block-Attention's layout of a LazyAttention request: documents' keys re-rotated to their
    logical offsets ``S_d = start + sum_{e<d} L_e`` (``R(S_d) R(i) k = R(S_d + i) k``, RoFormer Eq. 34)
    and concatenated with the tail. Returns float32 ``(k (Hkv, L + M, d), v (Hkv, L + M, dv))``;
    ``attention_oracle(q, k, v, causal=q.ndim == 3)`` is then the float64 truth for
    :func:`lazy_reference`."""
    rk = _rk()
    cfg = rk.LazyConfig() if config is None else config
    from retrokv.reference.rope import rotate_by

    ks, vs, pos = [], [], int(start)
    for i, (dk, dv) in enumerate(documents):
        dk, dv = _f32(dk, f"documents[{i}] keys"), _f32(dv, f"documents[{i}] values")
        ks.append(rotate_by(dk, np.full(dk.shape[1], pos)[None, :], cfg.theta, cfg.convention))
        vs.append(dv)
        pos += dk.shape[1]
    ks.append(_f32(k_tail, "k_tail"))
    vs.append(_f32(v_tail, "v_tail"))
    return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)


# name -> the reference function, for problems drawn by retrokv.testing.strategies.method_problems
METHODS = {"wave": wave_reference, "topk": topk_reference, "streaming": streaming_reference,
           "quest": quest_reference, "ivf": ivf_reference, "graph": graph_reference}


def method_reference(problem):
    """The reference ``(out, lse)`` of a :class:`retrokv.testing.strategies.MethodProblem`."""
    fn = METHODS.get(problem.method)
    if fn is None:
        raise ValueError(f"unknown method {problem.method!r}; expected one of {sorted(METHODS)}")
    if problem.method == "graph":
        return fn(problem.q, problem.k, problem.v, problem.prefill_queries, problem.config)
    return fn(problem.q, problem.k, problem.v, problem.config)
