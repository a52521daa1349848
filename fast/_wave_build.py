"""Building RetroInfer's wave index, fast path: the meta index (RetroInfer §4.2) and how it lies in memory.

Same contract as ``build_meta_index`` / ``concat_meta`` of ``reference/wave_index.py`` (re-exported by
:mod:`retrokv.fast.wave_index`): segmented k-means per KV head (:mod:`retrokv.fast.clustering`), the
cluster-sorted copy of the keys and values, and the small per-cluster arrays moved onto transparent huge
pages (:func:`_on_huge_pages`), because every decode step reads them cold.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from retrokv.reference import wave_index as _ref
from retrokv.reference.wave_index import MetaIndex, empty_meta

from ._dispatch import any_cupy, cuda, require_numpy
from .clustering import segmented_kmeans

_HUGE_PAGE = 2 << 20                              # bytes of a transparent huge page (x86-64 Linux)


def _on_huge_pages(meta):
    """``meta`` with its per-cluster arrays and sorted token ids moved into one 2 MiB-aligned block, when
    they fill at least a huge page (else unchanged). Same values, C-contiguous views.

    A decode step reads these arrays cold: between two steps of a layer the model's weights have evicted
    them, and the step touches hundreds of 4 KiB pages of them (every centroid, the estimated clusters'
    value sums scattered across all of them), one TLB miss each. NumPy asks Linux for transparent huge
    pages only for allocations of 4 MiB and more, which the cluster-sorted keys and values are and these
    arrays, a few MB together at 32K tokens, are not; one block of at least 4 MiB is. Measured by
    ``python benchmarks/wave_step_cold.py``."""
    parts = (meta.centroids, meta.value_sums, meta.sizes, meta.offsets, meta.ids)
    if not all(isinstance(a, np.ndarray) for a in parts):
        return meta
    padded = [-(-a.nbytes // 64) * 64 for a in parts]         # each array starts on a cache line
    if sum(padded) < _HUGE_PAGE:
        return meta
    block = np.empty(sum(padded) + _HUGE_PAGE, dtype=np.uint8)   # >= 4 MiB: NumPy madvises huge pages
    at = -block.ctypes.data % _HUGE_PAGE
    moved = []
    for a, n in zip(parts, padded):
        view = block[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
        view[...] = a
        moved.append(view)
        at += n
    cent, vs, sizes, offs, ids = moved
    return MetaIndex(cent, vs, sizes, offs, meta.keys, meta.values, ids)


def concat_meta(a, b):
    """The reference's :func:`~retrokv.reference.wave_index.concat_meta` (an index update), its small
    arrays then put on huge pages as :func:`build_meta_index` puts them."""
    return _on_huge_pages(_ref.concat_meta(a, b))


@nb.njit(parallel=True, cache=True)
def _take_rows(x, order):
    """``x[order]`` for a 2-D float32 array, in parallel (the cluster-sorted KV copy)."""
    out = np.empty((order.shape[0], x.shape[1]), dtype=x.dtype)
    for i in nb.prange(order.shape[0]):
        out[i] = x[order[i]]
    return out


def build_meta_index(keys, values, positions, n_clusters, n_segments, iters=10):
    """Same contract as :func:`retrokv.reference.wave_index.build_meta_index` (CUDA for CuPy input)."""
    if any_cupy(keys, values):
        return cuda("wave_index").build_meta_index(keys, values, positions, n_clusters, n_segments, iters)
    require_numpy("build_meta_index", keys, values)
    hkv, m, d = keys.shape
    dv = values.shape[2]
    if m == 0 or n_clusters == 0:
        return empty_meta(hkv, d, dv)
    positions = np.asarray(positions, dtype=np.int64)
    cent, vs, sizes, offs, sk, sv, ids = [], [], [], [], [], [], []
    for h in range(hkv):
        kh, vh = np.ascontiguousarray(keys[h], np.float32), np.ascontiguousarray(values[h], np.float32)
        c = segmented_kmeans(kh, vh, n_clusters, n_segments, iters)
        cent.append(c.centroids), vs.append(c.value_sums), sizes.append(c.sizes), offs.append(c.offsets)
        sk.append(_take_rows(kh, c.order)), sv.append(_take_rows(vh, c.order)), ids.append(positions[c.order])
    return _on_huge_pages(MetaIndex(*(np.stack(x) for x in (cent, vs, sizes, offs, sk, sv, ids))))
