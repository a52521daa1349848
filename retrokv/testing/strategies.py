"""Hypothesis strategies for attention problems: shapes, adversarial values, RoPE, sparse-method configs.

::

    from hypothesis import given
    from retrokv.testing import assert_attention_close, strategies as S

    @given(S.attention_problems())
    def test_my_kernel(p):
        assert_attention_close(my_kernel(p.q, p.k, p.v, **p.kwargs), p.q, p.k, p.v, **p.kwargs)

Shapes follow retrokv (``q (Hq, [T,] d)``, ``k, v (Hkv, N, d)``, ``Hq = G * Hkv``) and include the edges
kernels get wrong: ``N = 0`` (no key: output 0, ``lse = -inf``), ``N = 1``, odd ``d`` and ``dv != d``,
``G > 1``, blocks with ``T = N``. Value regimes (``REGIMES``) aim at the numerics:

* ``"gaussian"``: the easy case, at a few magnitudes;
* ``"huge_scores"``: scores up to ``1e4``, far past float32's ``exp`` overflow at ~88.7: a softmax that does
  not subtract the maximum returns inf/NaN;
* ``"duplicate_keys"``: repeated keys with different values (ties in any top-k);
* ``"equal_keys"``: every key of a head identical (uniform attention; no key stands out);
* ``"dominant_key"``: one key holds nearly all the mass (an index that misses it is badly wrong);
* ``"ood_queries"``: keys in a tight cloud far from the origin, queries far from the cloud (scores large
  and nearly equal: cancellation in ``s - max``), the query/key gap of RetrievalAttention §2.4.

Arrays are generated from a drawn seed (fast, reproducible; hypothesis shrinks the shape and the seed).
Only this module needs hypothesis.
"""
from __future__ import annotations

import dataclasses
import inspect

import numpy as np
from hypothesis import strategies as st

from .problems import AttentionProblem, GQAShape, LazyProblem, MethodProblem, RopeProblem

__all__ = ["REGIMES", "METHODS", "gqa_shapes", "attention_problems", "causal_problems", "rope_problems",
           "method_configs", "method_problems", "lazy_problems", "seeds",
           "AttentionProblem", "GQAShape", "RopeProblem", "MethodProblem", "LazyProblem"]

REGIMES = ("gaussian", "huge_scores", "duplicate_keys", "equal_keys", "dominant_key", "ood_queries")
METHODS = ("wave", "topk", "streaming", "quest", "ivf", "graph", "lazy")
EXP_OVERFLOW_F32 = float(np.log(np.finfo(np.float32).max))      # ~88.72: exp() beyond this is inf


def _strategy(fn):
    """``st.composite(fn)`` exposed as a plain function of this module (``fn``'s name, docstring and
    signature without ``draw``), so that documentation tools and ``help()`` see an ordinary function."""
    built = st.composite(fn)

    def strategy(*args, **kwargs):
        return built(*args, **kwargs)

    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(strategy, attr, getattr(fn, attr))
    sig = inspect.signature(fn)
    strategy.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    return strategy


def seeds():
    """Seeds for ``np.random.default_rng``."""
    return st.integers(0, 2**32 - 1)


def _n(min_n, max_n):
    # the edges N = 0 and N = 1 are drawn often, not left to chance
    edges = [n for n in (0, 1) if min_n <= n <= max_n]
    middle = st.integers(min_n, max_n)
    return st.one_of(st.sampled_from(edges), middle) if edges else middle


@_strategy
def gqa_shapes(draw, *, max_kv_heads=3, max_group=4, min_n=0, max_n=70, head_dims=(1, 3, 8, 17, 64),
               value_dims=None, decode=None, max_t=9, causal=False):
    """A :class:`GQAShape`. ``value_dims=None`` draws ``dv = d`` or another width; ``decode=None`` draws
    both decode (``T = None``) and blocks (``1 <= T <= max_t``); ``causal=True`` keeps ``T <= N``."""
    hkv = draw(st.integers(1, max_kv_heads))
    g = draw(st.integers(1, max_group))
    d = draw(st.sampled_from(head_dims))
    dv = draw(st.one_of(st.just(d), st.sampled_from((1, 5, 16)))) if value_dims is None else \
        draw(st.sampled_from(value_dims))
    is_decode = draw(st.booleans()) if decode is None else decode
    n = draw(_n(max(min_n, 1 if causal and not is_decode else 0), max_n))
    t = None
    if not is_decode:
        hi = min(max_t, n) if causal else max_t
        t = draw(st.integers(1, max(1, hi)))
    return GQAShape(hkv * g, hkv, n, d, dv, t)


def _values(regime, shape: GQAShape, rng, causal):
    """q, k, v float32 for one regime (see the module docstring)."""
    hq, hkv, n, d, dv, t = shape.hq, shape.hkv, shape.n, shape.d, shape.dv, shape.t
    g = hq // hkv
    qshape = shape.q_shape
    v = rng.standard_normal((hkv, n, dv))
    if regime == "gaussian":
        mag = rng.choice([0.1, 1.0, 4.0])
        q, k = rng.standard_normal(qshape) * mag, rng.standard_normal((hkv, n, d)) * mag
    elif regime == "huge_scores":
        q, k = rng.standard_normal(qshape), rng.standard_normal((hkv, n, d))
        s = np.abs(_raw_scores(q, k, g)).max(initial=0.0) / np.sqrt(d)
        if s > 0:  # rescale q and k together so that the largest |score| is the target
            f = np.sqrt(rng.choice([1e2, 1e3, 1e4]) / s)
            q, k = q * f, k * f
    elif regime in ("duplicate_keys", "equal_keys"):
        q, k = rng.standard_normal(qshape), rng.standard_normal((hkv, n, d))
        if n and regime == "equal_keys":
            k[:] = k[:, :1]
        elif n > 1:
            src = rng.integers(0, n, size=max(1, n // 2))
            dst = rng.integers(0, n, size=len(src))
            k[:, dst] = k[:, src]
    elif regime == "dominant_key":
        # queries of a KV head share a direction u; one visible key is a long vector along u
        u = rng.standard_normal((hkv, 1, d))
        u *= 1.0 / np.linalg.norm(u, axis=-1, keepdims=True)
        qh = np.repeat(u, g, axis=0)                                              # (Hq, 1, d)
        q = (qh[:, 0] if t is None else np.repeat(qh, t, axis=1)) * 2.0 + 0.2 * rng.standard_normal(qshape)
        k = rng.standard_normal((hkv, n, d)) * 0.3
        if n:
            hi = n - t + 1 if (causal and t is not None) else n                  # visible to every query
            j = rng.integers(0, max(1, hi), size=hkv)
            gap = rng.choice([10.0, 30.0])                                        # score margin over the rest
            k[np.arange(hkv), j] = u[:, 0] * gap * np.sqrt(d) / 2.0
    elif regime == "ood_queries":
        mu = rng.standard_normal((hkv, 1, d))
        mu *= rng.choice([5.0, 20.0]) / np.linalg.norm(mu, axis=-1, keepdims=True)
        k = mu + 0.5 * rng.standard_normal((hkv, n, d))                           # a tight cloud away from 0
        mu_q = np.repeat(mu, g, axis=0)                                           # (Hq, 1, d)
        far = -0.5 * (mu_q[:, 0] if t is None else mu_q) + rng.choice([3.0, 10.0]) * rng.standard_normal(qshape)
        q = far
    else:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    return tuple(np.ascontiguousarray(a, dtype=np.float32) for a in (q, k, v))


def _raw_scores(q, k, g):
    q3 = q[:, None] if q.ndim == 2 else q
    return np.einsum("htd,hnd->htn", q3, np.repeat(k, g, axis=0))


@_strategy
def attention_problems(draw, *, regimes=REGIMES, decode=None, causal=None, scales=(None,), **shape_kwargs):
    """An :class:`AttentionProblem` in one of ``regimes``.

    ``decode``/``causal``: ``None`` draws both. ``scales``: score scales to draw from (``None`` is
    ``1/sqrt(d)``). Other keywords go to :func:`gqa_shapes` (``max_n``, ``head_dims``, ...).
    """
    is_causal = draw(st.booleans()) if causal is None else causal
    shape = draw(gqa_shapes(decode=decode, causal=is_causal, **shape_kwargs))
    if shape.t is None:
        is_causal = False  # one decode query sees every key
    regime = draw(st.sampled_from(regimes))
    rng = np.random.default_rng(draw(seeds()))
    q, k, v = _values(regime, shape, rng, is_causal)
    return AttentionProblem(q, k, v, causal=is_causal, scale=draw(st.sampled_from(scales)), regime=regime)


def causal_problems(**kwargs):
    """Causal blocks (``T > 1`` queries, the last T positions, ``T <= N``): prefill chunks."""
    kwargs.setdefault("max_t", 9)
    return attention_problems(decode=False, causal=True, **kwargs).filter(lambda p: p.q.shape[1] > 1)


@_strategy
def rope_problems(draw, *, head_dims=(2, 8, 64, 128), thetas=(1e4, 1e5, 5e5), max_tokens=32,
                  offsets=(0, 1, 4095, 8192, 1 << 20, (1 << 20) + 12345, 3_000_000)):
    """A :class:`RopeProblem`: vectors ``(h, n, d)``, positions ``offset + [0, span)`` with offsets up to
    3M (long-context RoPE: float32 angles lose precision linearly in the position), a ``delta`` for
    ``R(delta) R(p) = R(p + delta)`` (negative included), both conventions."""
    h = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_tokens))
    d = draw(st.sampled_from(head_dims))
    offset = draw(st.sampled_from(offsets))
    rng = np.random.default_rng(draw(seeds()))
    x = (rng.standard_normal((h, n, d)) * rng.choice([0.5, 3.0, 30.0])).astype(np.float32)
    positions = offset + rng.integers(0, draw(st.sampled_from([16, 8192])), n)
    delta = draw(st.one_of(st.sampled_from([0, 1, -1, 37, 1 << 20, -(1 << 19)]), st.integers(-5000, 5000)))
    delta = max(delta, -int(positions.min()))                 # keep p + delta >= 0, like a real position
    return RopeProblem(x, positions.astype(np.int64), int(delta), draw(st.sampled_from(thetas)),
                       draw(st.sampled_from(["half", "interleaved"])))


# ---------------------------------------------------------------------------------------------------
# sparse-method configurations, small enough for inputs of tens to hundreds of tokens

def _config(cls, **kwargs):
    """``cls(**kwargs)`` keeping only the fields ``cls`` has (configs evolve; a strategy should not break)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})


def _fraction():
    # budgets as fractions in (0, 1]: the spelling every version of WaveConfig accepts
    return st.one_of(st.sampled_from([0.02, 0.1, 0.25, 0.5, 1.0]), st.floats(0.001, 1.0))


@_strategy
def method_configs(draw, method, *, full_budget=False):
    """A config object for ``method`` (one of ``METHODS``), drawn small. ``full_budget=True`` draws one
    that reads every token exactly (retrieval budget 1, top-k/page budget/window >= any N here), for
    the "budget 100% is full attention" invariant."""
    import retrokv as rk

    small = st.integers(0, 8)
    if method == "wave":
        return _config(rk.WaveConfig, n_sink=draw(small), n_local=draw(st.integers(0, 32)),
                       tokens_per_cluster=draw(st.sampled_from([1, 2, 4, 8, 16])),
                       segment_tokens=draw(st.sampled_from([8, 32, 8192])), kmeans_iters=draw(st.integers(1, 3)),
                       retrieval_budget=1.0 if full_budget else draw(_fraction()),
                       estimation_budget=draw(_fraction()), estimation=draw(st.booleans()),
                       update_every=draw(st.integers(1, 64)), update_clusters=draw(st.integers(1, 8)),
                       min_index_tokens=draw(st.sampled_from([0, 0, 0, 48])))   # mostly clustered; sometimes dense
    big = 1 << 20
    if method == "streaming":
        return _config(rk.StreamingConfig, n_sink=draw(small), n_recent=big if full_budget else draw(st.integers(0, 64)))
    if method == "topk":
        return _config(rk.TopKConfig, n_sink=draw(small), n_recent=draw(st.integers(0, 32)),
                       top_k=big if full_budget else draw(st.integers(1, 32)))
    if method == "ivf":
        return _config(rk.IVFConfig, n_sink=draw(small), n_recent=draw(st.integers(0, 32)),
                       top_k=big if full_budget else draw(st.integers(1, 32)),
                       n_lists=draw(st.one_of(st.none(), st.integers(1, 16))),
                       nprobe=big if full_budget else draw(st.one_of(st.none(), st.integers(1, 8))),
                       probe_fraction=1.0 if full_budget else draw(_fraction()), iters=draw(st.integers(1, 4)))
    if method == "quest":
        page = draw(st.sampled_from([1, 2, 4, 16]))
        return _config(rk.QuestConfig, n_sink=draw(small), n_recent=draw(st.integers(0, 32)), page_size=page,
                       token_budget=big if full_budget else page * draw(st.integers(1, 16)),
                       top_k=draw(st.integers(1, 32)))
    if method == "graph":
        k = big if full_budget else draw(st.integers(1, 16))
        return _config(rk.GraphConfig, n_sink=draw(small), n_recent=draw(st.integers(0, 32)), top_k=k,
                       n_query_neighbors=draw(st.integers(2, 16)), max_degree=draw(st.integers(2, 8)),
                       pool_cap=draw(st.integers(4, 32)), search_L=k if full_budget else draw(st.integers(1, 32)),
                       metric=draw(st.sampled_from(["l2", "ip"])), enhance=draw(st.booleans()),
                       build_queries=draw(st.one_of(st.none(), st.integers(1, 64))))
    if method == "lazy":
        return _config(rk.LazyConfig, block=draw(st.sampled_from([1, 4, 16])),
                       theta=draw(st.sampled_from([1e4, 1e5])), convention=draw(st.sampled_from(["half", "interleaved"])))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@_strategy
def method_problems(draw, method, *, regimes=REGIMES, full_budget=False, max_n=120, **shape_kwargs):
    """A :class:`MethodProblem`: one decode step of ``method`` (any of ``METHODS`` but ``"lazy"``, see
    :func:`lazy_problems`) with a drawn config. ``oracles.method_reference(problem)`` is retrokv's
    output for it; with ``full_budget=True`` that output is full attention."""
    if method not in METHODS or method == "lazy":
        raise ValueError(f"method must be one of {tuple(m for m in METHODS if m != 'lazy')}, got {method!r}")
    config = draw(method_configs(method, full_budget=full_budget))
    shape_kwargs.setdefault("head_dims", (2, 7, 16))
    shape = draw(gqa_shapes(decode=True, max_n=max_n, **shape_kwargs))
    regime = draw(st.sampled_from(regimes))
    rng = np.random.default_rng(draw(seeds()))
    q, k, v = _values(regime, shape, rng, False)
    pq = None
    if method == "graph":
        tq = draw(st.integers(1, 48))
        pq = (q[:, None] + rng.standard_normal((shape.hq, tq, shape.d))).astype(np.float32)
    return MethodProblem(method, config, q, k, v, pq, regime)


@_strategy
def lazy_problems(draw, *, max_docs=3, max_doc_len=24, max_tail=8, decode=None, starts=(0, 3, 100, 4096)):
    """A :class:`LazyProblem`: 0..``max_docs`` documents prefilled alone (keys at positions ``0..L-1``),
    laid out from ``start``, then a tail whose last T tokens are the queries (or one decode query)."""
    from retrokv.reference.rope import apply_rope

    config = draw(method_configs("lazy"))
    hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 8, 16]))
    lengths = draw(st.lists(st.integers(1, max_doc_len), max_size=max_docs))
    start = draw(st.sampled_from(starts))
    is_decode = draw(st.booleans()) if decode is None else decode
    m = draw(st.integers(0 if is_decode else 1, max_tail))
    rng = np.random.default_rng(draw(seeds()))
    rope = dict(theta=config.theta, convention=config.convention)
    docs = []
    for length in lengths:
        k = rng.standard_normal((hkv, length, d)).astype(np.float32)
        docs.append((apply_rope(k, np.arange(length)[None, :], **rope),          # document-local positions
                     rng.standard_normal((hkv, length, d)).astype(np.float32)))
    q_start = start + sum(lengths)                                                 # first tail position
    tail_pos = q_start + np.arange(m)
    k_tail = apply_rope(rng.standard_normal((hkv, m, d)).astype(np.float32), tail_pos[None, :], **rope)
    v_tail = rng.standard_normal((hkv, m, d)).astype(np.float32)
    if is_decode:
        q = apply_rope(rng.standard_normal((hkv * g, d)).astype(np.float32), q_start + max(m - 1, 0), **rope)
    else:
        t = draw(st.integers(1, m))
        q = apply_rope(rng.standard_normal((hkv * g, t, d)).astype(np.float32), tail_pos[None, m - t:], **rope)
    return LazyProblem(tuple(docs), k_tail, v_tail, q, start, config)
