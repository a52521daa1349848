"""The ball-bound ranking of the wave index's clusters, and its mix with the plain ranking (opt-in, not in
RetroInfer; NumPy or CuPy, as the input).

A centroid dilutes one sharp key among its cluster's. The ball bound ranks each cluster by its centroid score
plus ``w |q|`` times the cluster's radius (the largest distance of one of its keys from the centroid; ``w = 1``
bounds the cluster's best key score from above, by Cauchy-Schwarz), so a spread cluster that may hold a sharp
key gets the benefit of the doubt. A mixed ranking lets the plain ranking's best ``n_plain`` clusters lead.
:func:`retrokv.reference.wave_index.rank_clusters` applies both; the fast and CUDA rankings call these same
functions.
"""
from __future__ import annotations

import numpy as np

from .clustering import _array_module


def ball_bound(scores, qb, radii, radius_weight, scale):
    """The ball-bound ranking scores ``scores + radius_weight |q| radii * scale`` (``(Hkv, G, C)`` float32) for
    the centroid scores ``scores (Hkv, G, C)`` of the queries ``qb (Hkv, G, d)``; NumPy or CuPy, as the input."""
    xp = _array_module(scores)
    qn = xp.linalg.norm(qb, axis=2, keepdims=True).astype(np.float32)          # (Hkv, G, 1)
    return xp.ascontiguousarray(scores + np.float32(radius_weight * scale) * qn * radii[:, None, :], dtype=np.float32)


def check_radii(radii, radius_weight, shape):
    """A ``ValueError`` unless ``radius_weight`` is 0 or ``radii`` has the clusters' ``shape`` ``(Hkv, C)``."""
    if radius_weight and (radii is None or tuple(radii.shape) != tuple(shape)):
        raise ValueError(f"radius_weight={radius_weight} needs the clusters' radii of shape {tuple(shape)} "
                         f"(cluster_radii(meta)), got {None if radii is None else tuple(radii.shape)}")


def cluster_radii(meta):
    """``(Hkv, C)`` float32: each cluster's radius, the largest distance of one of its keys from its centroid
    (0 for an empty cluster). Read by the ranking's ball bound (:func:`rank_clusters`, ``radius_weight``);
    computed from the cluster-sorted keys, so it changes only when the index does."""
    hkv, c, _ = meta.centroids.shape
    out = np.zeros((hkv, c), np.float32)
    for h in range(hkv):
        sizes = np.asarray(meta.sizes[h])
        rows = int(meta.offsets[h, -1])
        cid = np.repeat(np.arange(c), sizes)                             # each sorted row's cluster
        dist = np.linalg.norm(meta.keys[h, :rows] - meta.centroids[h][cid], axis=1)
        np.maximum.at(out[h], cid, dist.astype(np.float32))
    return out


def check_n_plain(n_plain, radius_weight):
    """``n_plain`` as an int if it is an int >= 0, and 0 unless a ball bound (``radius_weight > 0``) is there
    to mix with; else a ``ValueError``."""
    if isinstance(n_plain, (bool, np.bool_)) or not isinstance(n_plain, (int, np.integer)) or n_plain < 0:
        raise ValueError(f"n_plain must be an int >= 0 (clusters of the plain ranking), got {n_plain!r}")
    if n_plain and not radius_weight:
        raise ValueError(f"n_plain={n_plain} mixes the plain ranking with the ball bound: it needs radius_weight > 0")
    return int(n_plain)


def lead_with(rank, first):
    """A copy of ``rank (Hkv, C)`` in which the clusters ``first (Hkv, n)`` rank first (``+inf``; ties keep the
    id order, as :func:`retrokv.reference.wave_index.select_zones` breaks them). NumPy or CuPy, as the input."""
    out = rank.copy()
    out[_array_module(rank).arange(rank.shape[0])[:, None], first] = np.inf
    return out
