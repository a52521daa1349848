"""Segmented spherical k-means on the GPU (RetroInfer §4.2, §5.1): same contract as ``reference/clustering.py``.

The algorithm is the reference's, step for step (centre the keys; per segment, evenly spaced initial
keys and ``iters - 1`` spherical rounds; one global assignment whose centroids are plain means):

* **assignment** is a GEMM plus an arg-max: ``argmax(x @ C^T)`` through ``xp`` (cuBLAS on a GPU), in
  the reference's blocks of :func:`~retrokv.reference.clustering.block_rows` keys, so the score
  matrix stays bounded;
* **update** is a sort plus a segmented reduction rather than atomic adds: the tokens are sorted by
  cluster (a stable sort, which is also the inverted list the index needs), then the kernel
  :func:`_segment_sum_kernel` runs one block per cluster with threads over the ``d`` columns, each
  thread summing its column over the cluster's members in token order in float64. The order is
  fixed, so the sums are deterministic and equal to the reference's scatter-add bit for bit (atomic
  adds would be neither), and a thread's reads of a member row are coalesced with its neighbours'.

Under the CUDA simulator (NumPy arrays, NumPy's BLAS) the clusters equal the reference's exactly;
on a GPU cuBLAS may round a score differently, so a near-tie can go to the other centroid: the tests
there check the structure (a partition, offsets, centroid = mean of members), not the labels.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float64

from retrokv.reference.clustering import (Clusters, block_rows, kmeans_flops, plan_clusters,  # not hot
                                          segment_bounds)

from ._xp import argsort_stable, float_array, launch, xp

__all__ = ["Clusters", "plan_clusters", "segment_bounds", "segmented_kmeans", "kmeans_flops", "assign",
           "block_rows", "sort_by_cluster", "sums_by_cluster"]


@cuda.jit
def _segment_sum_kernel(x, order, offsets, sums):
    """Block ``i``: float64 column sums of the rows ``x[order[offsets[i]:offsets[i + 1]]]``; threads over columns."""
    i = cuda.blockIdx.x
    for col in range(cuda.threadIdx.x, x.shape[1], cuda.blockDim.x):
        s = float64(0.0)
        for p in range(offsets[i], offsets[i + 1]):     # members in token order: a fixed summation order
            s += float64(x[order[p], col])
        sums[i, col] = s


def assign(x, centroids):
    """Same blocks and result as :func:`retrokv.reference.clustering.assign`: GEMM + arg-max through ``xp``."""
    m = xp(x, centroids)
    b = block_rows(len(centroids))
    out = m.empty(len(x), dtype=np.int64)
    ct = centroids.T
    for i in range(0, len(x), b):
        out[i:i + b] = m.argmax(x[i:i + b] @ ct, axis=1)
    return out


def sort_by_cluster(labels, n_clusters):
    """``(order, offsets, counts)``: tokens sorted by cluster (stable, so token order inside a cluster)."""
    m = xp(labels)
    counts = m.bincount(labels, minlength=n_clusters).astype(np.int64)
    offsets = m.concatenate([m.zeros(1, np.int64), m.cumsum(counts)])
    return argsort_stable(m, labels).astype(np.int64), offsets, counts


def sums_by_cluster(x, order, offsets):
    """Float64 per-cluster sums ``(C, d)`` of the rows of ``x``, by the segmented-reduction kernel."""
    m = xp(x, order)
    sums = m.zeros((offsets.shape[0] - 1, x.shape[1]), np.float64)
    launch(_segment_sum_kernel, sums.shape[0], x, order, offsets, sums)
    return sums


def _normalise(m, v64, previous):
    """L2-normalise float64 rows to float32; a zero row keeps its previous centroid (as the reference)."""
    norm = m.sqrt((v64 * v64).sum(axis=1, keepdims=True))          # (c, 1)
    unit = (v64 / m.where(norm > 0, norm, 1.0)).astype(np.float32)
    return m.where(norm > 0, unit, previous)


def segmented_kmeans(keys, values, n_clusters, n_segments, iters=10):
    """Same contract as :func:`retrokv.reference.clustering.segmented_kmeans`; returns :class:`Clusters` in ``xp``."""
    m = xp(keys, values)
    keys = float_array(m, keys)
    values = float_array(m, values)
    n, d = keys.shape
    dv = values.shape[1]
    if n == 0 or n_clusters == 0:
        z = m.zeros
        return Clusters(z((0, d), np.float32), z((0, dv), np.float32), z(0, np.int64), z(1, np.int64),
                        z(0, np.int64), z(0, np.int64))
    per_seg = n_clusters // n_segments
    mean = keys.astype(np.float64).mean(axis=0).astype(np.float32)   # (d,)
    x = keys - mean                                                   # (M, d) centred keys (MagicPIG)
    bounds = segment_bounds(n, n_segments)

    cents = []
    for s in range(n_segments):                                       # spherical k-means per segment
        xs = x[int(bounds[s]):int(bounds[s + 1])]                     # (L, d)
        init = m.asarray((np.arange(per_seg) * len(xs)) // per_seg)   # evenly spaced initial keys
        c = _normalise(m, xs[init].astype(np.float64), xs[init])      # (c, d)
        for _ in range(iters - 1):
            order, offsets, counts = sort_by_cluster(assign(xs, c), per_seg)
            sums = sums_by_cluster(xs, order, offsets)
            c = m.where(counts[:, None] > 0, _normalise(m, sums, c), c)   # empty clusters keep theirs
        cents.append(c)
    cent = m.concatenate(cents)                                       # (C, d)

    final = assign(x, cent)                                           # global assignment
    order, offsets, sizes = sort_by_cluster(final, n_clusters)
    key_sums = sums_by_cluster(keys, order, offsets)                  # raw keys: the Jensen bound needs them
    value_sums = sums_by_cluster(values, order, offsets)
    centroids = m.where(sizes[:, None] > 0, key_sums / m.maximum(sizes, 1)[:, None], 0.0).astype(np.float32)
    return Clusters(centroids, value_sums.astype(np.float32), sizes, offsets, order, final)
