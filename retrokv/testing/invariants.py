"""Reusable invariant checks: properties any correct implementation of these papers must have.

Each ``check_*`` returns ``None`` when the property holds and raises an ``AssertionError`` saying what
broke, where, by how much and against which tolerance otherwise. They take plain arrays (NumPy, torch,
CuPy) or callables, so they apply to a third-party kernel as well as to retrokv:

* :func:`check_lse_merge_associative`: partial attentions merge by log-sum-exp, in any grouping
  (RetrievalAttention App. B; RetroInfer's weighted flash-decoding);
* :func:`check_zones_partition`: the zones of one decode step cover every token exactly once
  (RetroInfer §4.1: steady, retrieval, estimation, dropped);
* :func:`check_jensen_lower_bound`: a cluster's centroid estimate never over-counts its exp-mass
  (RetroInfer Eq. 3, from Jensen's inequality);
* :func:`check_full_budget_equals_full_attention`: an index that may read every token is exact;
* :func:`check_rotation_composes`: RoPE rotations compose, ``R(a) R(b) = R(a + b)`` (RoFormer Eq. 34;
  what LazyAttention §3 builds on).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ._arrays import EPS, to_numpy

__all__ = ["check_lse_merge_associative", "check_zones_partition", "check_jensen_lower_bound",
           "check_full_budget_equals_full_attention", "check_rotation_composes"]

_EPS32 = EPS["float32"]


def _fmt_index(idx):
    return "(" + ", ".join(str(int(i)) for i in idx) + ")"


def _worst(a, b):
    """max |a - b| (NaN and -inf/finite mismatches as inf, matching -inf as 0) and where."""
    with np.errstate(invalid="ignore"):
        err = np.abs(a - b)
    err = np.where(np.isneginf(a) & np.isneginf(b), 0.0, err)
    err = np.where(np.isnan(err), np.inf, err)
    if err.size == 0:
        return 0.0, ()
    i = np.unravel_index(int(np.argmax(err)), err.shape)
    return float(err[i]), i


# ---------------------------------------------------------------------------------------------------
# 1. the log-sum-exp merge

def _merge64(parts):
    """RetrievalAttention App. B in float64: ``lse = log sum_i e^{lse_i}``, ``out = sum_i e^{lse_i - lse} out_i``."""
    outs = np.stack([o for o, _ in parts])                     # (P, ..., dv)
    lses = np.stack([l for _, l in parts])                     # (P, ...)
    m = lses.max(axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    w = np.exp(lses - m)                                       # 0 for empty parts (lse = -inf)
    tot = w.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(tot[..., None] > 0, (w[..., None] * outs).sum(axis=0) / tot[..., None], 0.0)
        lse = np.log(tot) + m
    return out, lse


def check_lse_merge_associative(partials, merge=None, *, atol=None, lse_atol=None):
    """The merge of partial attentions is the log-sum-exp merge, whatever the grouping and order.

    ``partials`` is a sequence of ``(out (..., dv), lse (...))`` pairs over disjoint key sets (an empty
    set has ``lse = -inf``). ``merge(list_of_pairs) -> (out, lse)`` is the function under test (default
    retrokv's reference). Checks, against RetrievalAttention App. B evaluated in float64
    (``lse = log sum_i exp(lse_i)``, ``out = sum_i exp(lse_i - lse) out_i``):

    * merging all parts at once gives App. B's result;
    * merging the parts reversed, and every split ``[merge(p[:c]), merge(p[c:])]``, and a left fold
      ``merge([merge([p0, p1]), p2])...`` give the same result (associativity, order independence);

    within ``atol`` (default ``16 eps32 * max |out_i|`` per merge level) and ``lse_atol`` (default
    ``16 eps32 * (1 + max |lse_i|)``).
    """
    parts = [(to_numpy(o, f"partials[{i}] out"), to_numpy(l, f"partials[{i}] lse")) for i, (o, l) in enumerate(partials)]
    if not parts:
        raise ValueError("partials must hold at least one (out, lse) pair")
    if merge is None:
        from retrokv.reference.attention import merge_partials as merge
    n = len(parts)
    omax = max(float(np.abs(o).max(initial=0.0)) for o, _ in parts)
    lmax = max(float(np.abs(l[np.isfinite(l)]).max(initial=0.0)) for _, l in parts)
    depth = max(1, n)                                           # a left fold rounds once per level
    atol = 16 * _EPS32 * max(omax, 1e-30) * depth if atol is None else atol
    lse_atol = 16 * _EPS32 * (1 + lmax) * depth if lse_atol is None else lse_atol

    def run(group):
        o, l = merge([(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in group])
        return to_numpy(o, "merged out"), to_numpy(l, "merged lse")

    def compare(got, want, label, against):
        for what, a, b, tol in (("out", got[0], want[0], atol), ("lse", got[1], want[1], lse_atol)):
            if a.shape != b.shape:
                raise AssertionError(f"{label}: {what} has shape {a.shape}, expected {b.shape}")
            err, i = _worst(a, b)
            if err > tol:
                raise AssertionError(
                    f"LSE merge broken: {label} differs from {against} in {what}: max |diff| {err:.3g} at "
                    f"{_fmt_index(i)} (got {a[i]:.6g}, expected {b[i]:.6g}; tolerance {tol:.3g}). "
                    "The merge must be lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i "
                    "(RetrievalAttention App. B), with lse = -inf parts contributing nothing.")

    truth = _merge64(parts)
    flat = run(parts)
    compare(flat, truth, f"merging all {n} parts at once", "RetrievalAttention App. B in float64")
    compare(run(parts[::-1]), flat, "merging the parts in reverse order", "merging them in order")
    for c in range(1, n):
        compare(run([run(parts[:c]), run(parts[c:])]), flat,
                f"merging [merge(parts[:{c}]), merge(parts[{c}:])]", f"merging all {n} parts at once")
    acc = parts[0]
    for i in range(1, n):
        acc = run([acc, parts[i]])
    compare(acc if n > 1 else run(parts), flat, "a left fold merge([merge([p0, p1]), p2], ...)",
            f"merging all {n} parts at once")


# ---------------------------------------------------------------------------------------------------
# 2. zones partition the tokens

def _per_head(ids, n_heads):
    """A zone given as one id array for every head, or one per head -> a list of n_heads int arrays."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 or np.isscalar(ids):
        return [np.asarray(ids, np.int64).reshape(-1)] * n_heads
    return [np.asarray(x, np.int64).reshape(-1) for x in ids]


def _n_heads(zones):
    for ids in zones.values():
        if not (isinstance(ids, np.ndarray) and ids.ndim == 1):
            return len(ids)
    return 1


def _wave_zones(stats, meta, n_tokens):
    """WaveStats + MetaIndex -> per-zone token ids per head, after the bookkeeping checks of the stats."""
    hkv = len(stats.exact_ids)
    total = stats.n_tokens if n_tokens is None else n_tokens
    if stats.n_tokens != total:
        raise AssertionError(f"zones: the step saw n_tokens={stats.n_tokens}, expected {total}")
    sizes = np.asarray(meta.sizes)
    indexed = sizes.sum(axis=1)
    if (indexed != total - stats.steady_tokens).any():
        h = int(np.argmax(indexed != total - stats.steady_tokens))
        raise AssertionError(f"zones (KV head {h}): the clusters hold {int(indexed[h])} tokens but "
                             f"{total} - {stats.steady_tokens} steady = {total - stats.steady_tokens} are not steady")
    exact, est, dropped = [], [], []
    for h in range(hkv):
        r, e = np.asarray(stats.retrieval_clusters[h]), np.asarray(stats.estimation_clusters[h])
        both = np.intersect1d(r, e)
        if both.size:
            raise AssertionError(f"zones (KV head {h}): cluster {int(both[0])} is in both the retrieval and the "
                                 "estimation zone")
        if len(np.unique(r)) != len(r) or len(np.unique(e)) != len(e):
            raise AssertionError(f"zones (KV head {h}): a cluster is listed twice in one zone")
        members = [np.asarray(meta.ids[h, meta.offsets[h, i]:meta.offsets[h, i + 1]]) for i in range(sizes.shape[1])]
        rest = np.setdiff1d(np.arange(sizes.shape[1]), np.concatenate([r, e]))
        cat = lambda cl: np.concatenate([members[i] for i in cl] + [np.zeros(0, np.int64)])   # noqa: E731
        exact.append(np.asarray(stats.exact_ids[h]))
        est.append(cat(e))
        dropped.append(cat(rest))
        n_r, n_e, n_d = (int(np.asarray(x)[h]) for x in (stats.retrieval_tokens, stats.estimation_tokens,
                                                           stats.dropped_tokens))
        counts = {"retrieval_tokens": (n_r, sizes[h, r].sum()), "estimation_tokens": (n_e, len(est[-1])),
                  "dropped_tokens": (n_d, len(dropped[-1])),
                  "exact_ids": (len(exact[-1]), stats.steady_tokens + n_r)}
        for name, (got, want) in counts.items():
            if got != want:
                raise AssertionError(f"zones (KV head {h}): stats.{name} says {got}, the clusters give {want}")
        missing = np.setdiff1d(cat(r), exact[-1])
        if missing.size:
            raise AssertionError(f"zones (KV head {h}): retrieved tokens {missing[:10].tolist()} were not attended "
                                 "exactly (not in exact_ids)")
    return {"exact (steady + retrieval)": exact, "estimation": est, "dropped": dropped}, total


def check_zones_partition(zones, n_tokens=None, meta=None):
    """Every token is in exactly one zone, for every head (RetroInfer §4.1).

    ``zones`` is either

    * a mapping ``{zone name: token ids}``, the ids one array shared by all heads or a sequence of per-head
      arrays (e.g. ``{"steady": ..., "retrieval": ..., "estimation": ..., "dropped": ...}`` from your
      kernel), with ``n_tokens`` the context length; or
    * a :class:`retrokv.WaveIndex` after :meth:`~retrokv.WaveIndex.attend` (its ``last_stats`` and
      ``meta``), or a :class:`retrokv.WaveStats` with ``meta``: the zones are then the exactly attended
      tokens (steady + retrieved clusters), the estimated clusters' tokens and the dropped clusters'
      tokens, and the stats' token counts are checked against the clusters too.

    Raises an ``AssertionError`` naming the head, the token and the zones involved.
    """
    if hasattr(zones, "last_stats") and hasattr(zones, "meta"):
        if zones.last_stats is None:
            raise ValueError("the index has no last_stats: call attend(q) before checking its zones")
        zones, meta = zones.last_stats, zones.meta
    if hasattr(zones, "exact_ids") and hasattr(zones, "estimation_clusters"):
        if meta is None:
            raise ValueError("checking WaveStats needs meta=index.meta (the clusters' tokens)")
        zones, n_tokens = _wave_zones(zones, meta, n_tokens)
    if not isinstance(zones, Mapping) or not zones:
        raise TypeError(f"zones must be a non-empty mapping of zone name -> token ids, a WaveIndex or WaveStats, "
                        f"got {type(zones).__name__}")
    if n_tokens is None:
        raise ValueError("n_tokens is needed with a mapping of zones")
    n_heads = _n_heads(zones)
    per = {name: _per_head(ids, n_heads) for name, ids in zones.items()}
    for name, heads in per.items():
        if len(heads) != n_heads:
            raise ValueError(f"zone {name!r} has {len(heads)} heads, another zone has {n_heads}")
    for h in range(n_heads):
        owner = np.full(n_tokens, -1)
        names = list(per)
        for z, name in enumerate(names):
            ids = per[name][h]
            bad = ids[(ids < 0) | (ids >= n_tokens)]
            if bad.size:
                raise AssertionError(f"zones (head {h}): zone {name!r} holds token {int(bad[0])}, outside [0, {n_tokens})")
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise AssertionError(f"zones (head {h}): zone {name!r} holds token {int(uniq[counts > 1][0])} "
                                     f"{int(counts.max())} times")
            taken = ids[owner[ids] >= 0]
            if taken.size:
                t = int(taken[0])
                raise AssertionError(f"zones (head {h}): token {t} is in both {names[owner[t]]!r} and {name!r} "
                                     f"({taken.size} tokens in both)")
            owner[ids] = z
        lost = np.flatnonzero(owner < 0)
        if lost.size:
            raise AssertionError(f"zones (head {h}): tokens {lost[:10].tolist()}{' ...' if lost.size > 10 else ''} "
                                 f"({lost.size} of {n_tokens}) are in no zone ({', '.join(map(repr, names))})")


# ---------------------------------------------------------------------------------------------------
# 3. Jensen's lower bound per cluster

def _lse(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def check_jensen_lower_bound(q, keys, clusters=None, centroids=None, sizes=None, *, scale=None, slack=None):
    """RetroInfer Eq. 3: ``s_i exp(q.C_i) <= sum_{k in cluster i} exp(q.k)`` for every cluster and query.

    Because ``exp`` is convex and ``C_i`` is the plain mean of the cluster's keys, Jensen's inequality gives
    ``exp(q.C_i) <= mean_j exp(q.k_j)``: the estimation zone (Eq. 2) never over-counts a cluster's
    exp-mass. A centroid that is normalised (spherical k-means' unit centroid), stale after an update,
    or paired with a wrong size can break it.

    Args:
        q (array): ``(d,)`` or ``(G, d)`` queries (any ``q`` must satisfy it).
        keys (array | MetaIndex): ``(n, d)`` keys; or a :class:`~retrokv.reference.wave_index.MetaIndex`
            (``index.meta``), with ``q (Hq, d)`` and the clusters, centroids and sizes taken from it per KV head.
        clusters (array | sequence | None): ``(n,)`` cluster id of each key, or member-index arrays.
        centroids (array | None): ``(C, d)`` the centroids your index stores (default: the float64 means).
        sizes (array | None): ``(C,)`` the sizes your estimate uses (default: the member counts).
        scale (float | None): score scale (default ``1/sqrt(d)``; the bound holds for any positive scale).
        slack (float | None): allowed excess in log-mass (default ``1e-6 + 8 eps32 * scale * max |q| |k|``: float32
            rounding of a stored centroid).
    """
    if clusters is None and hasattr(keys, "offsets") and hasattr(keys, "centroids"):
        meta = keys
        qa = to_numpy(q, "q")
        hkv = np.asarray(meta.centroids).shape[0]
        qa = qa.reshape(hkv, -1, qa.shape[-1])
        for h in range(hkv):
            offs = np.asarray(meta.offsets[h])
            groups = [np.arange(offs[i], offs[i + 1]) for i in range(len(offs) - 1)]
            try:
                check_jensen_lower_bound(qa[h], np.asarray(meta.keys[h]), groups, np.asarray(meta.centroids[h]),
                                         np.asarray(meta.sizes[h]), scale=scale, slack=slack)
            except AssertionError as e:
                raise AssertionError(f"KV head {h}: {e}") from None
        return
    qa = np.atleast_2d(to_numpy(q, "q"))                               # (G, d)
    ka = to_numpy(keys, "keys")                                         # (n, d)
    if clusters is None:
        raise ValueError("clusters (a label per key, or member-index arrays) is needed with plain keys")
    if isinstance(clusters, np.ndarray) and clusters.ndim == 1 and len(clusters) == len(ka) and clusters.dtype.kind in "iu":
        labels = clusters
        n_c = int(labels.max(initial=-1)) + 1 if centroids is None else len(centroids)
        groups = [np.flatnonzero(labels == i) for i in range(n_c)]
    else:
        groups = [np.asarray(g, np.int64) for g in clusters]
    d = ka.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else float(scale)
    cents = None if centroids is None else to_numpy(centroids, "centroids")
    szs = None if sizes is None else np.asarray(sizes)
    kmax = float(np.linalg.norm(ka, axis=-1).max(initial=0.0))
    qmax = float(np.linalg.norm(qa, axis=-1).max(initial=0.0))
    tol = 1e-6 + 8 * _EPS32 * scale * qmax * kmax if slack is None else slack
    for i, members in enumerate(groups):
        size = len(members) if szs is None else int(szs[i])
        if size == 0:
            continue                                                    # an empty cluster has no estimate
        if len(members) == 0:
            raise AssertionError(f"RetroInfer Eq. 3: cluster {i} has size {size} but no member keys")
        c = ka[members].mean(axis=0) if cents is None else cents[i]
        for j, qq in enumerate(qa):
            lhs = np.log(size) + scale * float(c @ qq)                  # log(s_i exp(q.C_i))
            rhs = _lse(scale * (ka[members] @ qq))                      # log sum_j exp(q.k_j)
            if lhs - rhs > tol:
                raise AssertionError(
                    f"RetroInfer Eq. 3 (Jensen) violated for cluster {i} ({len(members)} keys, size {size}), "
                    f"query {j}: log(size * exp(q.C)) = {lhs:.6g} exceeds log sum exp(q.k) = {rhs:.6g} by "
                    f"{lhs - rhs:.3g} (slack {tol:.3g}). The estimate over-counts this cluster's exp-mass: "
                    "is C the plain mean of the cluster's keys (not normalised) and the size its member count?")


# ---------------------------------------------------------------------------------------------------
# 4. a full budget is full attention

def _full_budget_config(cls, n, pq):
    import retrokv as rk

    def make(config_cls, **kw):
        names = {f.name for f in dataclasses.fields(config_cls)}
        return config_cls(**{k: v for k, v in kw.items() if k in names})

    n1 = max(1, n)
    table = {
        "WaveIndex": lambda: make(rk.WaveConfig, retrieval_budget=1.0),
        "TopKOracle": lambda: make(rk.TopKConfig, top_k=n1),
        "StreamingLLM": lambda: make(rk.StreamingConfig, n_recent=n),
        "IVFIndex": lambda: make(rk.IVFConfig, top_k=n1, probe_fraction=1.0),
        "QuestIndex": lambda: make(rk.QuestConfig, token_budget=max(n1, 16)),
        "GraphIndex": lambda: make(rk.GraphConfig, top_k=n1, search_L=n1),
    }
    if cls.__name__ not in table:
        raise TypeError(f"no full-budget config known for {cls.__name__}; pass a builder (keys, values) -> index")
    if cls.__name__ == "GraphIndex" and pq is None:
        raise ValueError("GraphIndex needs prefill_queries (Hq, Tq, d) to build its graph")
    return table[cls.__name__]()


def check_full_budget_equals_full_attention(index_cls_or_builder, q, k, v, *, prefill_queries=None,
                                            backend="reference", atol_factor=4.0, atol_floor=None):
    """An index allowed to read every token exactly must return full attention (and its lse).

    ``index_cls_or_builder`` is a retrokv index class (``WaveIndex``, ``TopKOracle``, ``StreamingLLM``,
    ``IVFIndex``, ``QuestIndex``, ``GraphIndex``: built here with a budget covering every token, e.g.
    RetroInfer's retrieval budget 100%) or a callable ``builder(keys, values) -> index`` whose index has
    ``attend(q)`` (``attend(q, return_lse=True)`` is used when it accepts it). ``q (Hq, d)``,
    ``k, v (Hkv, N, d)``. The output is judged by :func:`retrokv.testing.assert_attention_close`.
    """
    from .tolerances import attention_close

    if isinstance(index_cls_or_builder, type) and hasattr(index_cls_or_builder, "build"):
        cls = index_cls_or_builder
        n = to_numpy(k, "k").shape[1]
        cfg = _full_budget_config(cls, n, prefill_queries)
        index = cls.build(k, v, prefill_queries, config=cfg, backend=backend)   # the DecodeIndex interface
        name = f"{cls.__name__} with {cfg!r}"
    elif callable(index_cls_or_builder):
        index = index_cls_or_builder(k, v)
        name = f"the index from {getattr(index_cls_or_builder, '__name__', 'the builder')}"
    else:
        raise TypeError(f"index_cls_or_builder must be an index class or a callable, got {type(index_cls_or_builder).__name__}")
    if not hasattr(index, "attend"):
        raise TypeError(f"{name} has no attend(q) method")
    try:
        out, lse = index.attend(q, return_lse=True)
    except TypeError:
        out, lse = index.attend(q), None
    report = attention_close(out, q, k, v, lse=lse, atol_factor=atol_factor, atol_floor=atol_floor)
    if not report.passed:
        raise AssertionError(f"a full budget must give full attention, but {name} does not:\n{report.message}")


# ---------------------------------------------------------------------------------------------------
# 5. RoPE rotations compose

def check_rotation_composes(rotate, a, b, x=None, *, d=64, atol=None, seed=0):
    """``R(a) R(b) x = R(a + b) x`` and ``R(-a) R(a) x = x`` for a rotary embedding (RoFormer Eq. 34).

    ``rotate(x, positions) -> x rotated`` is the function under test, e.g.
    ``functools.partial(retrokv.apply_rope, theta=1e5)`` or a kernel's own; ``a``, ``b`` are integer
    positions (arrays broadcastable to ``x.shape[:-1]``, offsets beyond 1M welcome). ``x`` defaults to
    Gaussian ``(3, 5, d)`` vectors.

    The default tolerance is what float32 allows: an angle ``p * theta^{-2i/d}`` is rounded to float32,
    so it carries up to ``eps32/2 * |p|`` radians of error (at 1M tokens, ~0.06 rad: long-context RoPE
    in float32 is imprecise); the three angles involved give ``|dx| <= 2 max|x| (eps32 (|a| + |b| +
    |a+b|) + 16 eps32)``. Breaks that it catches: a position offset (``p + 1``), a non-rotation (wrong
    ``rotate_half`` pairing), angles rounded through float16/bfloat16, a missing or doubled rotation.
    """
    xa = np.random.default_rng(seed).standard_normal((3, 5, d)).astype(np.float32) if x is None else \
        np.asarray(to_numpy(x, "x"), np.float32)
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    big = float(np.abs(a).max() + np.abs(b).max() + np.abs(a + b).max())
    xmax = float(np.abs(xa).max(initial=0.0))
    tol = 2 * xmax * (_EPS32 * big + 16 * _EPS32) if atol is None else atol

    def rot(y, p):
        return np.asarray(to_numpy(rotate(y, p), "rotate(x, positions)"), np.float32)

    composed = rot(rot(xa, b), a)
    direct = rot(xa, a + b)
    err, i = _worst(composed.astype(np.float64), direct.astype(np.float64))
    if err > tol:
        raise AssertionError(
            f"RoPE does not compose: max |R(a) R(b) x - R(a + b) x| = {err:.3g} at {_fmt_index(i)} "
            f"(got {composed[i]:.6g}, expected {direct[i]:.6g}) with a = {_brief(a)}, b = {_brief(b)}; "
            f"tolerance {tol:.3g} (float32 angle rounding at these positions)")
    norm_x = np.linalg.norm(xa.astype(np.float64), axis=-1)
    norm_r = np.linalg.norm(rot(xa, a).astype(np.float64), axis=-1)
    err, i = _worst(norm_r, np.broadcast_to(norm_x, norm_r.shape))
    if err > 2 * tol:
        raise AssertionError(f"RoPE is not a rotation: |R(a) x| differs from |x| by {err:.3g} at {_fmt_index(i)} "
                             f"with a = {_brief(a)}; tolerance {2 * tol:.3g}")
    back = rot(rot(xa, a), -a)
    err, i = _worst(back.astype(np.float64), xa.astype(np.float64))
    tol_inv = 2 * xmax * (_EPS32 * 2 * float(np.abs(a).max()) + 16 * _EPS32) if atol is None else atol
    if err > tol_inv:
        raise AssertionError(f"RoPE is not inverted by the opposite rotation: max |R(-a) R(a) x - x| = {err:.3g} at "
                             f"{_fmt_index(i)} with a = {_brief(a)}; tolerance {tol_inv:.3g}")


def _brief(p):
    p = np.asarray(p)
    return str(int(p)) if p.ndim == 0 else f"[{int(p.min())}..{int(p.max())}] (shape {p.shape})"
