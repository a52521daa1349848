"""Segmented spherical k-means on the GPU (RetroInfer §4.2, §5.1): same contract as ``reference/clustering.py``.

The driver is the reference's (:func:`retrokv.reference.clustering.segmented_kmeans`, run with this
module's kernels as ``ops``), step for step (centre the keys; per segment, evenly spaced initial
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

import sys

import numpy as np
from numba import cuda, float64

from retrokv.reference import clustering as _ref
from retrokv.reference.clustering import (Clusters, block_rows, kmeans_flops, plan_clusters,  # not hot
                                          segment_bounds)

from ._xp import argsort_stable, float_array, launch, xp

__all__ = ["Clusters", "plan_clusters", "segment_bounds", "segmented_kmeans", "kmeans_flops", "assign",
           "group_by_cluster", "cluster_sums", "block_rows"]


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


def group_by_cluster(assign, n_clusters):
    """``(order, offsets, counts)``: tokens sorted by cluster (stable, so token order inside a cluster)."""
    m = xp(assign)
    counts = m.bincount(assign, minlength=n_clusters).astype(np.int64)
    offsets = m.concatenate([m.zeros(1, np.int64), m.cumsum(counts)])
    return argsort_stable(m, assign).astype(np.int64), offsets, counts


def cluster_sums(x, order, offsets):
    """Float64 per-cluster sums ``(C, d)`` of the rows of ``x``, by the segmented-reduction kernel."""
    m = xp(x, order)
    sums = m.zeros((offsets.shape[0] - 1, x.shape[1]), np.float64)
    launch(_segment_sum_kernel, sums.shape[0], x, order, offsets, sums)
    return sums


def segmented_kmeans(keys, values, n_clusters, n_segments, iters=10, ops=None):
    """The reference driver :func:`retrokv.reference.clustering.segmented_kmeans` with this module's kernels;
    returns :class:`Clusters` in ``xp``."""
    return _ref.segmented_kmeans(keys, values, n_clusters, n_segments, iters,
                                 ops=sys.modules[__name__] if ops is None else ops)
