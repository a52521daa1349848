"""RetroInfer's wave buffer: a two-tier KV store with a block cache and LRU (NumPy reference).

RetroInfer (arXiv 2505.02922, §4.3-4.4) keeps the whole KV cache in host memory and a small block
cache on the GPU. The wave index (§4.2) decides *which* clusters a decode step reads exactly; the
wave buffer decides *where* each one is read from. It never changes what is attended (the paper's
"accuracy-agnostic" property), only how many bytes cross PCIe.

Two tiers (here both are NumPy arrays; a GPU port allocates the host tier in **pinned host memory**,
so that the gather kernel reads misses straight from it over PCIe, and the device tier in **device
memory**):

* **host tier** (:class:`HostTier`): every cluster's keys, values and token ids, cluster after
  cluster, in fixed-size blocks of ``B`` vectors (the paper: 8 vectors x 128 dims x fp16 = 2 KB).
  Cluster ``i`` of head ``h`` occupies host blocks ``start[h, i] : start[h, i] + n_blocks[h, i]``;
  its last block holds ``sizes - (n_blocks - 1) * B`` vectors.
* **device tier** (:class:`DeviceTier`): a block cache of ``capacity`` blocks per KV head, sized as
  a fraction of the host tier (5% by default), plus the steady zone, which is the index's own steady
  arrays (on a GPU they live in device memory already; the buffer reads them in place).

The control plane (on the CPU, one manager per KV head, §4.4) is the **cluster mapping table**:
per cluster whether it is cached, the device block id of each of its blocks (``block_of``, indexed
by host block), its host start and its block count; plus an LRU list over the cached clusters and a
free list of device blocks. One decode step (:func:`gather_step`) for the retrieval zone ``R`` of
each head, in rank order:

1. **lookup**: hits are the clusters of ``R`` in the cache, misses the rest;
2. **admission**: misses in rank order take blocks from the free list, evicting least recently used
   clusters that are *not* in ``R``; a miss that cannot fit that way bypasses the cache;
3. **recency**: the cached clusters of ``R`` move to the most-recent end in reverse rank order, so
   the best-ranked cluster is the most recent;
4. **gather**: the execution buffer ``[steady | R in rank order]``; hits are read from device blocks,
   misses from host blocks: these are the only bytes that cross from host to device;
5. **scatter**: the admitted misses are copied into their device blocks. On a GPU this copy reads the
   execution buffer (device to device), so it moves no more bytes over PCIe.

Admission never evicts a cluster of ``R``, so the hits' device blocks are intact when step 4 reads them.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from .wave_index import stack_heads

__all__ = ["HostTier", "DeviceTier", "BufferState", "StepResult", "empty_state", "extend_host_tier",
           "extend_device_tier", "capacity_blocks", "sync_state", "plan_step", "fill_execution_buffer",
           "scatter_admitted", "gather_step", "read_cluster", "lru_order", "used_blocks"]


class HostTier(NamedTuple):
    """Every cluster's KV in blocks (pinned host memory on a GPU). Per head, clusters are laid out in order."""

    keys: np.ndarray        # (Hkv, HB, B, d) float32
    values: np.ndarray      # (Hkv, HB, B, dv) float32
    ids: np.ndarray         # (Hkv, HB, B) int64 token positions
    start: np.ndarray       # (Hkv, C) int64 first host block of each cluster
    n_blocks: np.ndarray    # (Hkv, C) int64 ceil(size / B)
    sizes: np.ndarray       # (Hkv, C) int64 vectors in each cluster


class DeviceTier(NamedTuple):
    """The block cache (device memory on a GPU): ``capacity`` blocks per KV head."""

    keys: np.ndarray        # (Hkv, cap, B, d) float32
    values: np.ndarray      # (Hkv, cap, B, dv) float32
    ids: np.ndarray         # (Hkv, cap, B) int64


class Table:
    """The reference control plane: cluster mapping table, LRU lists and free lists, per KV head."""

    def __init__(self, cached, block_of, free, lru):
        self.cached = cached          # (Hkv, C) bool
        self.block_of = block_of      # (Hkv, HB) int64 device block caching each host block, -1 if none
        self.free = free              # Hkv lists of free device block ids; allocation pops from the end
        self.lru = lru                # Hkv OrderedDicts of cached cluster ids, least recent first


class BufferState(NamedTuple):
    host: HostTier
    device: DeviceTier
    table: Table


class StepResult(NamedTuple):
    """What the control plane decided for one step; masks are aligned with ``retrieval (Hkv, r)``."""

    hit: np.ndarray         # (Hkv, r) bool: read from the device tier
    admitted: np.ndarray    # (Hkv, r) bool: a miss that entered the cache
    evicted: np.ndarray     # (E, 2) int64 (head, cluster) in eviction order


def empty_tiers(hkv, d, dv, block_size):
    """Empty host and device tiers (shared by both backends; only the mapping table differs)."""
    z = np.zeros
    host = HostTier(z((hkv, 0, block_size, d), np.float32), z((hkv, 0, block_size, dv), np.float32),
                    z((hkv, 0, block_size), np.int64), z((hkv, 0), np.int64), z((hkv, 0), np.int64),
                    z((hkv, 0), np.int64))
    device = DeviceTier(z((hkv, 0, block_size, d), np.float32), z((hkv, 0, block_size, dv), np.float32),
                        z((hkv, 0, block_size), np.int64))
    return host, device


def empty_state(hkv, d, dv, block_size):
    """A buffer with no clusters and no cache blocks."""
    z = np.zeros
    host, device = empty_tiers(hkv, d, dv, block_size)
    table = Table(z((hkv, 0), bool), z((hkv, 0), np.int64), [[] for _ in range(hkv)],
                  [OrderedDict() for _ in range(hkv)])
    return BufferState(host, device, table)


def extend_host_tier(host, meta):
    """Copy the clusters of ``meta`` that ``host`` does not hold yet into new host blocks.

    The index only ever appends clusters (RetroInfer §4.2 update), so old clusters keep their blocks.
    """
    hkv, hb, b, d = host.keys.shape
    dv = host.values.shape[3]
    c_old, c_new = host.sizes.shape[1], meta.sizes.shape[1]
    if c_new == c_old:
        return host
    if not np.array_equal(meta.sizes[:, :c_old], host.sizes):
        raise RuntimeError("the index's existing clusters changed; a wave buffer follows appends only")
    sizes = meta.sizes[:, c_old:].astype(np.int64)                       # (Hkv, c)
    n_blocks = -(-sizes // b)                                           # ceil
    used = host.start[:, -1] + host.n_blocks[:, -1] if c_old else np.zeros(hkv, np.int64)   # (Hkv,)
    start = used[:, None] + np.cumsum(n_blocks, axis=1) - n_blocks
    hb_new = int(max(hb, (start[:, -1] + n_blocks[:, -1]).max()))
    keys = np.zeros((hkv, hb_new, b, d), np.float32)
    values = np.zeros((hkv, hb_new, b, dv), np.float32)
    ids = np.full((hkv, hb_new, b), -1, np.int64)                       # -1: an empty slot
    keys[:, :hb], values[:, :hb], ids[:, :hb] = host.keys, host.values, host.ids
    for h in range(hkv):
        for j in range(c_new - c_old):
            lo, hi = meta.offsets[h, c_old + j], meta.offsets[h, c_old + j + 1]
            row = start[h, j] * b                                       # first vector slot of the cluster
            keys[h].reshape(-1, d)[row:row + hi - lo] = meta.keys[h, lo:hi]
            values[h].reshape(-1, dv)[row:row + hi - lo] = meta.values[h, lo:hi]
            ids[h].reshape(-1)[row:row + hi - lo] = meta.ids[h, lo:hi]
    return HostTier(keys, values, ids, np.concatenate([host.start, start], axis=1),
                    np.concatenate([host.n_blocks, n_blocks], axis=1), np.concatenate([host.sizes, sizes], axis=1))


def extend_device_tier(device, capacity):
    """Grow the block cache to ``capacity`` blocks per head (cached blocks keep their ids)."""
    hkv, cap, b, d = device.keys.shape
    if capacity <= cap:
        return device
    grow = ((0, 0), (0, capacity - cap), (0, 0))
    return DeviceTier(np.pad(device.keys, grow + ((0, 0),)), np.pad(device.values, grow + ((0, 0),)),
                      np.pad(device.ids, grow, constant_values=-1))


def capacity_blocks(host, cache_fraction):
    """Cache blocks per head: ``ceil(cache_fraction * host blocks)`` (the largest head's host tier)."""
    hb = int((host.start[:, -1] + host.n_blocks[:, -1]).max()) if host.sizes.shape[1] else 0
    return int(np.ceil(cache_fraction * hb - 1e-9))


def sync_state(state, meta, cache_fraction):
    """Bring the buffer up to date with ``meta``: new clusters enter the host tier, the cache grows."""
    host = extend_host_tier(state.host, meta)
    cap_old = state.device.keys.shape[1]
    cap = max(cap_old, capacity_blocks(host, cache_fraction))    # the cache never shrinks
    device = extend_device_tier(state.device, cap)
    t = state.table
    hkv, c = host.sizes.shape
    cached = np.zeros((hkv, c), bool)
    cached[:, :t.cached.shape[1]] = t.cached
    block_of = np.full((hkv, host.keys.shape[1]), -1, np.int64)
    block_of[:, :t.block_of.shape[1]] = t.block_of
    for free in t.free:                 # new block ids go on top, lowest first out
        free.extend(range(cap - 1, cap_old - 1, -1))
    return BufferState(host, device, Table(cached, block_of, t.free, t.lru))


def plan_step(state, retrieval):
    """Steps 1-3 (lookup, admission, recency) for ``retrieval (Hkv, r)`` in rank order: a :class:`StepResult`.

    Changes only the control plane; the data moves in :func:`fill_execution_buffer` and :func:`scatter_admitted`.
    """
    host, t = state.host, state.table
    hit = np.zeros(retrieval.shape, bool)
    admitted = np.zeros(retrieval.shape, bool)
    evicted = []
    for h, clusters in enumerate(retrieval):
        in_step = set(clusters.tolist())
        lru, free = t.lru[h], t.free[h]
        hit[h] = t.cached[h, clusters]                                   # 1. lookup
        for j, i in enumerate(clusters):                                 # 2. admission, in rank order
            if hit[h, j]:
                continue
            need = host.n_blocks[h, i]
            evictable = sum(host.n_blocks[h, c] for c in lru if c not in in_step)
            if len(free) + evictable < need:
                continue                                                 # bypass: read from host only
            while len(free) < need:                                      # evict the least recent, not in R
                victim = next(c for c in lru if c not in in_step)
                s = host.start[h, victim]
                blocks = t.block_of[h, s:s + host.n_blocks[h, victim]]
                free.extend(blocks[::-1].tolist())
                blocks[:] = -1
                t.cached[h, victim] = False
                del lru[victim]
                evicted.append((h, victim))
            s = host.start[h, i]
            t.block_of[h, s:s + need] = [free.pop() for _ in range(need)]
            t.cached[h, i] = True
            lru[int(i)] = None
            admitted[h, j] = True
        for i in clusters[::-1]:                                         # 3. recency: best-ranked last
            if t.cached[h, i]:
                lru.move_to_end(int(i))
    return StepResult(hit, admitted, np.array(evicted, np.int64).reshape(-1, 2))


def _cluster_rows(state, h, i, from_device):
    """Keys, values and ids of cluster ``i`` of head ``h``, read from the device blocks or the host blocks."""
    host = state.host
    s, n, size = host.start[h, i], host.n_blocks[h, i], host.sizes[h, i]
    if from_device:
        blocks, tier = state.table.block_of[h, s:s + n], state.device
    else:
        blocks, tier = np.arange(s, s + n), host
    d, dv = tier.keys.shape[3], tier.values.shape[3]
    return (tier.keys[h, blocks].reshape(-1, d)[:size], tier.values[h, blocks].reshape(-1, dv)[:size],
            tier.ids[h, blocks].reshape(-1)[:size])


def fill_execution_buffer(state, steady_k, steady_v, steady_ids, retrieval, hit, workspace=None):
    """Step 4: ``[steady | retrieved clusters in rank order]`` per head, hits from the device tier and
    misses from the host tier; the same :class:`ExecBuffer` as ``wave_index.gather_execution_buffer``.
    ``workspace`` (the index's reused arrays) is used by the fast path only."""
    heads = []
    for h, clusters in enumerate(retrieval):
        parts = [(steady_k[h], steady_v[h], steady_ids)]
        parts += [_cluster_rows(state, h, i, hit[h, j]) for j, i in enumerate(clusters)]
        heads.append(tuple(np.concatenate([p[x] for p in parts]) for x in range(3)))
    return stack_heads(heads)


def scatter_admitted(state, retrieval, admitted):
    """Step 5: copy each admitted cluster's host blocks into the device blocks it was given."""
    host, dev, t = state.host, state.device, state.table
    for h, j in zip(*np.nonzero(admitted)):
        i = retrieval[h, j]
        s, n = host.start[h, i], host.n_blocks[h, i]
        blocks = t.block_of[h, s:s + n]
        dev.keys[h, blocks], dev.values[h, blocks], dev.ids[h, blocks] = \
            host.keys[h, s:s + n], host.values[h, s:s + n], host.ids[h, s:s + n]


def gather_step(state, steady_k, steady_v, steady_ids, retrieval, workspace=None, ops=None):
    """One whole step (1-5): returns ``(ExecBuffer, StepResult)``.

    Written once: ``ops`` supplies ``plan_step``, ``fill_execution_buffer`` and ``scatter_admitted``
    (default: this module's; the fast path passes its own). The fill reads the blocks before the
    scatter overwrites any, so an admitted miss is read from the host tier in this step.
    """
    ops = _THIS if ops is None else ops
    retrieval = np.asarray(retrieval, dtype=np.int64)
    res = ops.plan_step(state, retrieval)
    buf = ops.fill_execution_buffer(state, steady_k, steady_v, steady_ids, retrieval, res.hit, workspace)
    ops.scatter_admitted(state, retrieval, res.admitted)
    return buf, res


def read_cluster(state, h, i):
    """Cluster ``i`` of head ``h`` as ``(keys, values, ids)``, from the cache when it is cached."""
    return _cluster_rows(state, h, i, bool(state.table.cached[h, i]))


def lru_order(state, h):
    """Cached cluster ids of head ``h``, least recently used first."""
    return np.array(list(state.table.lru[h]), dtype=np.int64)


def used_blocks(state):
    """Cache blocks in use per head ``(Hkv,)``."""
    cap = state.device.keys.shape[1]
    return np.array([cap - len(f) for f in state.table.free], dtype=np.int64)


_THIS = sys.modules[__name__]
