"""RetroInfer's wave buffer with a real device tier (§4.3-4.4): same names and decisions as ``reference/wave_buffer.py``.

What lives where follows the paper:

* **host tier** (:class:`HostTier`, the reference's layout): every cluster's keys, values and ids in
  ``B``-vector blocks, in page-locked host memory mapped into the GPU's address space
  (``pinned_copy``), so kernels read misses straight from it over PCIe; its ``start``, ``n_blocks`` and
  ``sizes`` (the control plane's view) are ordinary NumPy arrays;
* **device tier** (:class:`DeviceTier`): the block cache ``(Hkv, cap, B, d)`` in device memory, plus
  the device copy of the cluster mapping table that the kernels read: ``block_of`` (device block of
  each host block, -1 if not cached), each cluster's first host block and size;
* **control plane on the CPU** (as in the paper, one LRU per KV head): the Numba table of
  :mod:`retrokv.fast.wave_buffer` (lookup, admission in rank order, LRU eviction, recency), so hits,
  misses, evictions and block ids are exactly the reference's. Only the retrieval ids cross to the
  CPU (``Hkv x r`` integers) and only the entries of ``block_of`` that a step changed cross back.

Data movement is two kernels. :func:`_fill_kernel` (one block per (head, retrieved cluster), one per
head for the steady zone; threads over flattened (row, column)) builds the execution buffer
``[steady | retrieved in rank order]``, reading hits from device blocks and misses from mapped host
blocks. :func:`_scatter_kernel` (one block per admitted block, threads over its ``B x d`` floats)
copies admitted misses into their new device blocks; inside :func:`gather_step` it reads them from
the execution buffer just filled (device to device, as the paper does, so a miss crosses PCIe once);
:func:`scatter_admitted` alone reads the host tier.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import cuda

from retrokv.fast import wave_buffer as _cpu                      # the control plane: Numba, on the CPU
from retrokv.reference.wave_buffer import BufferState, HostTier, StepResult, capacity_blocks, extend_host_tier
from retrokv.reference.wave_index import ExecBuffer, MetaIndex

from ._lanes import lanes
from ._xp import asnumpy, device_xp, float_array, launch, pinned_copy
from .wave_index import steady_rows

__all__ = ["HostTier", "DeviceTier", "BufferState", "StepResult", "empty_state", "extend_host_tier",
           "extend_device_tier", "capacity_blocks", "sync_state", "plan_step", "fill_execution_buffer",
           "scatter_admitted", "scatter_from_buffer", "gather_step", "read_cluster", "lru_order", "used_blocks"]

lru_order = _cpu.lru_order
used_blocks = _cpu.used_blocks


class DeviceTier(NamedTuple):
    """The block cache and the device copy of the cluster mapping table (device memory on a GPU)."""

    keys: object            # (Hkv, cap, B, d) float32
    values: object          # (Hkv, cap, B, dv) float32
    ids: object             # (Hkv, cap, B) int64
    block_of: object        # (Hkv, HB) int64 device block of each host block, -1 if not cached
    start: object           # (Hkv, C) int64 first host block of each cluster
    sizes: object           # (Hkv, C) int64 vectors in each cluster


def empty_state(hkv, d, dv, block_size):
    """A buffer with no clusters and no cache blocks (device arrays in CuPy, or NumPy under the simulator)."""
    m = device_xp()
    z = np.zeros
    host = HostTier(pinned_copy(z((hkv, 0, block_size, d), np.float32)), pinned_copy(z((hkv, 0, block_size, dv), np.float32)),
                    pinned_copy(z((hkv, 0, block_size), np.int64)), z((hkv, 0), np.int64), z((hkv, 0), np.int64),
                    z((hkv, 0), np.int64))
    device = DeviceTier(m.zeros((hkv, 0, block_size, d), np.float32), m.zeros((hkv, 0, block_size, dv), np.float32),
                        m.zeros((hkv, 0, block_size), np.int64), m.zeros((hkv, 0), np.int64),
                        m.zeros((hkv, 0), np.int64), m.zeros((hkv, 0), np.int64))
    return BufferState(host, device, _cpu.empty_state(hkv, d, dv, block_size).table)


def extend_device_tier(device, capacity, host, block_of):
    """Grow the block cache to ``capacity`` blocks per head (cached blocks keep their ids) and upload
    the mapping table for a host tier that gained clusters (rare: once per index update)."""
    m = device_xp()
    hkv, cap, b, d = device.keys.shape
    dv = device.values.shape[3]
    keys, values, ids = device.keys, device.values, device.ids
    if capacity > cap:
        keys = m.concatenate([keys, m.zeros((hkv, capacity - cap, b, d), np.float32)], axis=1)
        values = m.concatenate([values, m.zeros((hkv, capacity - cap, b, dv), np.float32)], axis=1)
        ids = m.concatenate([ids, m.full((hkv, capacity - cap, b), -1, np.int64)], axis=1)
    return DeviceTier(keys, values, ids, m.asarray(block_of), m.asarray(host.start), m.asarray(host.sizes))


def _host_meta(meta, c_old):
    """The clusters of ``meta`` from ``c_old`` on, with their rows copied to the host (only the new rows move)."""
    sizes, offsets = asnumpy(meta.sizes), asnumpy(meta.offsets)
    lo, hi = offsets[:, c_old], offsets[:, -1]
    width = int((hi - lo).max(initial=0))
    hkv, d, dv = sizes.shape[0], meta.keys.shape[2], meta.values.shape[2]
    keys, values = np.zeros((hkv, width, d), np.float32), np.zeros((hkv, width, dv), np.float32)
    ids = np.zeros((hkv, width), np.int64)
    for h in range(hkv):
        n = int(hi[h] - lo[h])
        keys[h, :n] = asnumpy(meta.keys[h, lo[h]:hi[h]])
        values[h, :n] = asnumpy(meta.values[h, lo[h]:hi[h]])
        ids[h, :n] = asnumpy(meta.ids[h, lo[h]:hi[h]])
    return MetaIndex(None, None, sizes, offsets - lo[:, None], keys, values, ids)   # offsets rebased to the new rows


def _grow_table(t, host, cap_old, cap):
    """The Numba control plane grown to the host tier's clusters and ``cap`` cache blocks (new block ids
    go on top of the free stacks, lowest first out: the order of the reference and the Numba path)."""
    c, hb = host.sizes.shape[1], host.keys.shape[1]
    free = _cpu._pad(t.free, cap, -1)
    n_free = t.n_free.copy()
    new = np.arange(cap - 1, cap_old - 1, -1)
    for h in range(len(n_free)):
        free[h, n_free[h]:n_free[h] + len(new)] = new
        n_free[h] += len(new)
    return _cpu.Table(_cpu._pad(t.cached, c, False), _cpu._pad(t.block_of, hb, -1), free, n_free,
                      _cpu._pad(t.prev, c, -1), _cpu._pad(t.nxt, c, -1), t.ends.copy())


def sync_state(state, meta, cache_fraction):
    """Same contract as :func:`retrokv.reference.wave_buffer.sync_state`: new clusters enter the (pinned)
    host tier, the cache grows, the device mapping table is re-uploaded. Not hot (once per index update)."""
    c_old = state.host.sizes.shape[1]
    if meta.sizes.shape[1] != c_old:
        plain = HostTier(*(np.asarray(x) for x in state.host))
        grown = extend_host_tier(plain, _host_meta(meta, c_old))
        host = HostTier(pinned_copy(grown.keys), pinned_copy(grown.values), pinned_copy(grown.ids),
                        grown.start, grown.n_blocks, grown.sizes)
    else:
        host = state.host
    cap_old = state.device.keys.shape[1]
    cap = max(cap_old, capacity_blocks(host, cache_fraction))   # the cache never shrinks
    table = _grow_table(state.table, host, cap_old, cap)
    return BufferState(host, extend_device_tier(state.device, cap, host, table.block_of), table)


def plan_step(state, retrieval):
    """Same contract as :func:`retrokv.reference.wave_buffer.plan_step`, on the CPU as in the paper.

    The retrieval ids come to the host (``Hkv x r`` integers), the Numba control plane decides, and
    the entries of the device mapping table that changed (evicted and admitted clusters' host blocks)
    are written back: the device never sees the LRU lists.
    """
    ids = asnumpy(retrieval).astype(np.int64)
    res = _cpu.plan_step(state, ids)
    host, t = state.host, state.table
    touched = [(h, v) for h, v in res.evicted] + [(h, ids[h, j]) for h, j in zip(*np.nonzero(res.admitted))]
    if touched:
        hs = np.concatenate([np.full(host.n_blocks[h, i], h) for h, i in touched]).astype(np.int64)
        bs = np.concatenate([np.arange(host.start[h, i], host.start[h, i] + host.n_blocks[h, i])
                             for h, i in touched]).astype(np.int64)
        m = device_xp()
        state.device.block_of[m.asarray(hs), m.asarray(bs)] = m.asarray(t.block_of[hs, bs])
    return res


@cuda.jit(device=True)
def _cluster_rows(out, host, dev, h, row0, s0, n, block_of, from_device, r0, rs, c0, cs):
    """Rows ``0 .. n`` of a cluster whose first host block is ``s0`` into ``out[h, row0:]``: from its device
    blocks (``block_of``) on a hit, from the pinned host tier on a miss. The row's block and offset are
    carried from row to row (no division per row: see ``_lanes``)."""
    if r0 >= n:
        return
    bsz = host.shape[2]
    width = out.shape[2]
    blk = r0 // bsz                                # this thread's first row: block and offset in it
    off = r0 - blk * bsz
    for t in range(r0, n, rs):
        if from_device:                            # hit: device memory
            src = block_of[h, s0 + blk]
            for x in range(c0, width, cs):
                out[h, row0 + t, x] = dev[h, src, off, x]
        else:                                      # miss: crosses PCIe from pinned host memory
            for x in range(c0, width, cs):
                out[h, row0 + t, x] = host[h, s0 + blk, off, x]
        off += rs
        while off >= bsz:
            off -= bsz
            blk += 1


@cuda.jit
def _fill_kernel(bk, bv, bids, steady_k, steady_v, steady_ids, hk, hv, hids, dk, dv_, dids,
                 block_of, start, sizes, retrieval, hit, dst):
    """Block ``(h, j)``: retrieved cluster ``j`` of head ``h`` (hits from device blocks, misses from the
    mapped host tier), or the steady zone when ``j == r``; threads over the columns of a row (``_lanes``)."""
    r = retrieval.shape[1]
    h = cuda.blockIdx.x // (r + 1)
    j = cuda.blockIdx.x % (r + 1)
    d, dv, bsz = bk.shape[2], bv.shape[2], hk.shape[2]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    if j == r:
        steady_rows(bk, bv, bids, steady_k, steady_v, steady_ids, h, tid, nt)
        return
    kr0, krs, kc0, kcs = lanes(d, tid, nt)
    vr0, vrs, vc0, vcs = lanes(dv, tid, nt)
    i = retrieval[h, j]
    n = sizes[h, i]
    s0 = start[h, i]
    row0 = dst[h, j]
    from_device = hit[h, j]
    _cluster_rows(bk, hk, dk, h, row0, s0, n, block_of, from_device, kr0, krs, kc0, kcs)
    _cluster_rows(bv, hv, dv_, h, row0, s0, n, block_of, from_device, vr0, vrs, vc0, vcs)
    for t in range(tid, n, nt):
        hb = s0 + t // bsz
        bids[h, row0 + t] = dids[h, block_of[h, hb], t % bsz] if from_device else hids[h, hb, t % bsz]


def _layout(state, ids, s):
    """Host-side offsets of the execution buffer: ``(dst (Hkv, r), lengths (Hkv,))``."""
    sizes = np.take_along_axis(state.host.sizes, ids, axis=1)             # (Hkv, r)
    ends = s + np.cumsum(sizes, axis=1)
    lengths = (ends[:, -1] if ids.shape[1] else np.full(ids.shape[0], s)).astype(np.int64)
    return np.ascontiguousarray(ends - sizes), lengths


def fill_execution_buffer(state, steady_k, steady_v, steady_ids, retrieval, hit, workspace=None):
    """Same contract as the reference: ``[steady | retrieved in rank order]``, hits from the block cache,
    misses from the pinned host tier. ``lengths`` is a host array; rows past it are zero.
    ``workspace`` is accepted for the shared signature (CuPy's memory pool reuses the allocation)."""
    m = device_xp()
    host, dev = state.host, state.device
    hkv, s, d = steady_k.shape
    dv = steady_v.shape[2]
    ids = asnumpy(retrieval).astype(np.int64)
    dst, lengths = _layout(state, ids, s)
    width = int(lengths.max(initial=0))
    bk, bv = m.zeros((hkv, width, d), np.float32), m.zeros((hkv, width, dv), np.float32)
    bids = m.zeros((hkv, width), np.int64)
    if width:
        launch(_fill_kernel, hkv * (ids.shape[1] + 1), bk, bv, bids, float_array(m, steady_k),
               float_array(m, steady_v), m.ascontiguousarray(m.asarray(steady_ids), dtype=np.int64),
               host.keys, host.values, host.ids, dev.keys, dev.values, dev.ids, dev.block_of, dev.start, dev.sizes,
               m.asarray(ids), m.asarray(np.ascontiguousarray(hit, dtype=np.bool_)), m.asarray(dst))
    return ExecBuffer(bk, bv, bids, lengths)


@cuda.jit
def _scatter_kernel(dk, dv_, dids, src_k, src_v, src_ids, heads, src_row, n_valid, dev_block):
    """Block ``a``: copy ``n_valid[a]`` vectors starting at row ``src_row[a]`` of head ``heads[a]`` of the
    source (rows of ``(Hkv, rows, d)``) into device block ``dev_block[a]``; threads over the columns of a row (``_lanes``)."""
    a = cuda.blockIdx.x
    h, row, n, blk = heads[a], src_row[a], n_valid[a], dev_block[a]
    d, dv = dk.shape[3], dv_.shape[3]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    kr0, krs, kc0, kcs = lanes(d, tid, nt)
    vr0, vrs, vc0, vcs = lanes(dv, tid, nt)
    for t in range(kr0, n, krs):
        for x in range(kc0, d, kcs):
            dk[h, blk, t, x] = src_k[h, row + t, x]
    for t in range(vr0, n, vrs):
        for x in range(vc0, dv, vcs):
            dv_[h, blk, t, x] = src_v[h, row + t, x]
    for t in range(tid, n, nt):
        dids[h, blk, t] = src_ids[h, row + t]


@cuda.jit
def _copy_blocks_kernel(dk, dv_, dids, hk, hv, hids, heads, host_block, dev_block):
    """Block ``a``: host block ``host_block[a]`` of head ``heads[a]`` (pinned memory, over PCIe) into
    device block ``dev_block[a]``, whole (as the reference copies it); threads as in ``_lanes``."""
    a = cuda.blockIdx.x
    h, hb, blk = heads[a], host_block[a], dev_block[a]
    bsz, d, dv = dk.shape[2], dk.shape[3], dv_.shape[3]
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    kr0, krs, kc0, kcs = lanes(d, tid, nt)
    vr0, vrs, vc0, vcs = lanes(dv, tid, nt)
    for t in range(kr0, bsz, krs):
        for x in range(kc0, d, kcs):
            dk[h, blk, t, x] = hk[h, hb, t, x]
    for t in range(vr0, bsz, vrs):
        for x in range(vc0, dv, vcs):
            dv_[h, blk, t, x] = hv[h, hb, t, x]
    for t in range(tid, bsz, nt):
        dids[h, blk, t] = hids[h, hb, t]


def _admitted_blocks(state, ids, admitted, dst):
    """Per admitted block ``(head, host block, device block, valid vectors, execution-buffer row)``."""
    host, t = state.host, state.table
    bsz = host.keys.shape[2]
    rows = []
    for h, j in zip(*np.nonzero(admitted)):
        i = ids[h, j]
        for b in range(host.n_blocks[h, i]):
            hb = host.start[h, i] + b
            rows.append((h, hb, t.block_of[h, hb], min(bsz, host.sizes[h, i] - b * bsz), dst[h, j] + b * bsz))
    return [np.ascontiguousarray(c) for c in np.array(rows, np.int64).reshape(-1, 5).T]


def scatter_admitted(state, retrieval, admitted):
    """Step 5 (same contract as the reference): each admitted cluster's host blocks into the device
    blocks it was given, read from the pinned host tier by :func:`_copy_blocks_kernel`."""
    ids = asnumpy(retrieval).astype(np.int64)
    admitted = asnumpy(admitted)
    if not admitted.any():
        return
    m = device_xp()
    heads, hb, blk, _, _ = _admitted_blocks(state, ids, admitted, np.zeros(ids.shape, np.int64))
    h, dev = state.host, state.device
    launch(_copy_blocks_kernel, len(heads), dev.keys, dev.values, dev.ids, h.keys, h.values, h.ids,
           m.asarray(heads), m.asarray(hb), m.asarray(blk))


def gather_step(state, steady_k, steady_v, steady_ids, retrieval):
    """One whole step: plan on the CPU, fill the execution buffer, then scatter the admitted misses into
    the cache *from the buffer* (device to device, RetroInfer §4.4: a miss crosses PCIe once).
    Returns ``(ExecBuffer, StepResult)``; decisions and buffer are the reference's."""
    res = plan_step(state, retrieval)
    buf = fill_execution_buffer(state, steady_k, steady_v, steady_ids, retrieval, res.hit)
    scatter_from_buffer(state, retrieval, res.admitted, buf, steady_k.shape[1])
    return buf, res


def scatter_from_buffer(state, retrieval, admitted, buf, n_steady):
    """Step 5 the paper's way: the admitted misses into their device blocks, read from the execution
    buffer ``buf`` just filled (``n_steady`` steady rows first), device to device, so a miss crosses
    PCIe once (RetroInfer §4.4). Same cache contents as :func:`scatter_admitted`."""
    admitted = asnumpy(admitted)
    if not admitted.any():
        return
    m = device_xp()
    ids = asnumpy(retrieval).astype(np.int64)
    dst, _ = _layout(state, ids, n_steady)
    heads, _, blk, n_valid, row = _admitted_blocks(state, ids, admitted, dst)
    dev = state.device
    launch(_scatter_kernel, len(heads), dev.keys, dev.values, dev.ids, buf.keys, buf.values, buf.ids,
           *(m.asarray(x) for x in (heads, row, n_valid, blk)))


def read_cluster(state, h, i):
    """Cluster ``i`` of head ``h`` as ``(keys, values, ids)`` in device arrays, from the cache when it is cached."""
    m = device_xp()
    host = state.host
    s, n, size = int(host.start[h, i]), int(host.n_blocks[h, i]), int(host.sizes[h, i])
    if state.table.cached[h, i]:
        blocks = m.asarray(state.table.block_of[h, s:s + n])
        tier = state.device
    else:
        blocks = np.arange(s, s + n)
        tier = HostTier(*(np.asarray(x) for x in host))           # plain NumPy views of the pinned arrays
    d, dv = tier.keys.shape[3], tier.values.shape[3]
    return tuple(m.asarray(x) for x in (tier.keys[h, blocks].reshape(-1, d)[:size],
                                        tier.values[h, blocks].reshape(-1, dv)[:size],
                                        tier.ids[h, blocks].reshape(-1)[:size]))
