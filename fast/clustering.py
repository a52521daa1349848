"""Segmented spherical k-means, fast path: same names, same clusters as ``reference/clustering.py``.

The assignment step is a matrix product (keys x centroids), so it stays on NumPy's BLAS ``sgemm``
with exactly the shapes the reference uses (which is also why the clusters match bit for bit). What
Numba replaces is the bookkeeping around it, which in NumPy is a slow scatter-add and a sort:

* the centroid update: a counting sort of the tokens by cluster (the inverted lists come out of it
  for free), then float64 sums per cluster in token order, parallel over clusters;
* the final pass's key sums, value sums and sizes in one sweep.

The k-means driver itself (segments, rounds, the final pass) is the reference's
:func:`~retrokv.reference.clustering.segmented_kmeans`: this module hands it its kernels.

``plan_clusters``, ``segment_bounds``, ``kmeans_flops`` and the small (clusters x d) normalisation
are not hot and are imported from the reference.
"""
from __future__ import annotations

import sys

import numba as nb
import numpy as np

from retrokv.reference import clustering as _ref
from retrokv.reference.clustering import Clusters, block_rows, kmeans_flops, plan_clusters, segment_bounds  # not hot

from ._dispatch import any_cupy, cuda, require_numpy

__all__ = ["Clusters", "plan_clusters", "segment_bounds", "segmented_kmeans", "kmeans_flops", "assign",
           "group_by_cluster", "cluster_sums", "block_rows"]


def assign(x, centroids):
    """Same blocks and result as :func:`retrokv.reference.clustering.assign`.

    Both halves are already as fast as the machine allows: BLAS ``sgemm`` for the scores and NumPy's
    SIMD ``argmax`` (measured 7x faster than a plain Numba loop, which does not vectorise an arg-reduction).
    """
    b = block_rows(len(centroids))
    out = np.empty(len(x), dtype=np.int64)
    ct = centroids.T
    for i in range(0, len(x), b):
        np.argmax(x[i:i + b] @ ct, axis=1, out=out[i:i + b])    # exactly the reference's blocks
    return out


@nb.njit(cache=True)
def _counting_sort(assign, n_clusters):
    """Stable counting sort of tokens by cluster: ``(order, offsets, counts)``."""
    counts = np.zeros(n_clusters, dtype=np.int64)
    for a in assign:
        counts[a] += 1
    offsets = np.zeros(n_clusters + 1, dtype=np.int64)
    for i in range(n_clusters):
        offsets[i + 1] = offsets[i] + counts[i]
    fill = offsets[:-1].copy()
    order = np.empty(assign.shape[0], dtype=np.int64)
    for t in range(assign.shape[0]):
        a = assign[t]
        order[fill[a]] = t
        fill[a] += 1
    return order, offsets, counts


@nb.njit(parallel=True, cache=True)
def _sums_by_cluster(x, order, offsets):
    """Float64 sum of the rows of each cluster, members in token order (matches a scatter-add)."""
    c = offsets.shape[0] - 1
    d = x.shape[1]
    sums = np.zeros((c, d), dtype=np.float64)
    for i in nb.prange(c):
        for p in range(offsets[i], offsets[i + 1]):
            t = order[p]
            for j in range(d):
                sums[i, j] += np.float64(x[t, j])
    return sums


def group_by_cluster(assign, n_clusters):
    """Same contract as :func:`retrokv.reference.clustering.group_by_cluster`: one counting sort."""
    return _counting_sort(np.ascontiguousarray(assign, dtype=np.int64), int(n_clusters))


def cluster_sums(x, order, offsets):
    """Same contract as :func:`retrokv.reference.clustering.cluster_sums`, parallel over clusters."""
    return _sums_by_cluster(np.ascontiguousarray(x, dtype=np.float32), order, offsets)


def segmented_kmeans(keys, values, n_clusters, n_segments, iters=10, ops=None):
    """The reference driver :func:`retrokv.reference.clustering.segmented_kmeans` with this module's kernels
    (the CUDA kernels of :mod:`retrokv.fast.cuda.clustering` for CuPy input)."""
    if any_cupy(keys, values):
        return cuda("clustering").segmented_kmeans(keys, values, n_clusters, n_segments, iters, ops)
    require_numpy("segmented_kmeans", keys, values)
    return _ref.segmented_kmeans(keys, values, n_clusters, n_segments, iters,
                                 ops=sys.modules[__name__] if ops is None else ops)
