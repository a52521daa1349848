"""Measurements on captured Q/K: attention sparsity and the query/key distribution gap.

These back tutorial 00 and ``python -m retrokv.harness.sparsity``: how few keys hold most of the attention mass
(RetrievalAttention §2.2), how far decode queries sit from the key distribution compared with
held-out keys (RetrievalAttention §2.4: Mahalanobis distance), and what that does to a plain IVF index
probed with queries instead of keys (recall@k against the fraction of keys scanned, Fig. 3).
"""
from __future__ import annotations

import numpy as np

from retrokv.reference.baselines import kmeans


def mass_fraction(q, k, positions, mass=0.9):
    """Fraction of the visible keys that hold ``mass`` of each query's softmax.

    ``q (Hq, T, d)`` and ``k (Hkv, T, d)`` from one causal pass; ``positions``: the query positions to
    examine (each sees keys ``0..pos``). Returns ``(Hq, len(positions))``.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    hq, t, d = q.shape
    g = hq // k.shape[0]
    positions = np.asarray(positions)
    if positions.min(initial=0) < 0 or positions.max(initial=0) >= t:
        raise ValueError(f"positions must lie in [0, {t}), got range {positions.min()}..{positions.max()}")
    frac = np.empty((hq, len(positions)))
    for i, pos in enumerate(positions):
        keys = np.repeat(k[:, : pos + 1], g, axis=0)                            # (Hq, pos+1, d)
        scores = np.einsum("hd,hnd->hn", q[:, pos], keys) / np.sqrt(d)
        w = np.exp(scores - scores.max(1, keepdims=True))
        w = np.sort(w / w.sum(1, keepdims=True), axis=1)[:, ::-1]
        frac[:, i] = (np.argmax(np.cumsum(w, 1) >= mass - 1e-9, axis=1) + 1) / (pos + 1)
    return frac


def mahalanobis(x, mean, cov_inv):
    """Mahalanobis distance of each row of ``x (n, d)`` to a Gaussian (mean, inverse covariance)."""
    z = np.asarray(x, np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", z, cov_inv, z), 0))


def ood_distances(q, k, split):
    """Median Mahalanobis distance to the first ``split`` keys, of held-out keys and of queries.

    Per KV head ``h``: fit a Gaussian to ``k[h, :split]``; measure ``k[h, split:]`` and the queries of
    the heads that read it, ``q[h*G:(h+1)*G, split:]``. Returns ``(Hkv, 2)``: (keys, queries).
    """
    hkv, t, d = k.shape
    g = q.shape[0] // hkv
    if not d < split < t:
        raise ValueError(f"split must be in ({d}, {t}) so the covariance is full rank and keys are held out, got {split}")
    out = np.empty((hkv, 2))
    for h in range(hkv):
        base = k[h, :split].astype(np.float64)
        mean, cov = base.mean(0), np.cov(base.T) + 1e-6 * np.eye(d)
        cov_inv = np.linalg.inv(cov)
        out[h, 0] = np.median(mahalanobis(k[h, split:], mean, cov_inv))
        out[h, 1] = np.median(mahalanobis(q[h * g:(h + 1) * g, split:].reshape(-1, d), mean, cov_inv))
    return out


def ivf_recall_curves(keys, probe_sets, fractions, k=100, keys_per_list=16, iters=10):
    """Recall@k of one plain IVF index over ``keys (N, d)``, for each array of probes in ``probe_sets``.

    k-means lists (about ``keys_per_list`` keys each); a probe scans the lists whose centroids score
    highest by inner product until ``fraction * N`` keys are scanned (at least one list). Returns, per
    probe set, the mean recall@k (overlap with the exact top-k by inner product) for each fraction.
    """
    keys = np.asarray(keys, np.float32)
    k = min(k, len(keys))
    cent, assign = kmeans(keys, max(1, len(keys) // keys_per_list), iters=iters)
    sizes = np.bincount(assign, minlength=len(cent))
    curves = []
    for probes in probe_sets:
        probes = np.asarray(probes, np.float32)
        exact = np.argpartition(-(probes @ keys.T), k - 1, axis=1)[:, :k]       # (P, k)
        order = np.argsort(-(probes @ cent.T), axis=1)                           # (P, lists), best first
        curve = []
        for f in fractions:
            hits = 0
            for p in range(len(probes)):
                n_lists = max(1, int(np.searchsorted(np.cumsum(sizes[order[p]]), f * len(keys), side="right")))
                scanned = np.isin(assign, order[p, :n_lists])
                hits += scanned[exact[p]].sum()
            curve.append(hits / (k * len(probes)))
        curves.append(np.array(curve))
    return curves


def ivf_recall_curve(keys, probes, fractions, k=100, keys_per_list=16, iters=10):
    """:func:`ivf_recall_curves` for a single array of probes."""
    return ivf_recall_curves(keys, [probes], fractions, k, keys_per_list, iters)[0]
