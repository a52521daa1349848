"""RetroInfer's wave buffer, fast path: same names, same decisions as ``reference/wave_buffer.py``.

The reference's control plane is Python (sets, an ``OrderedDict`` per head); here it is the
cluster mapping table of RetroInfer §4.4 as flat arrays that one Numba kernel walks per step:

* ``cached (Hkv, C)``, ``block_of (Hkv, HB)`` (device block of each host block, -1 if none),
  a free-block stack ``free (Hkv, cap)`` with its height ``n_free (Hkv,)``;
* the LRU list as a doubly linked list in ``prev``/``nxt (Hkv, C)`` with ``ends (Hkv, 2)`` =
  (least recent, most recent): moving a hit to the front and evicting are O(1), as in the paper.

The same admission rule (misses in rank order, evicting least recent clusters outside the step,
bypass when they cannot fit), the same free-list order and the same recency order as the reference,
so hits, misses, evictions and device block ids are identical. The data movement (filling the
execution buffer from device and host blocks, scattering admitted blocks) is a parallel block copy.
Growing the tiers when the index appends clusters happens once per 1024 tokens and is not hot: it
reuses the reference's ``extend_host_tier``/``extend_device_tier``, as does ``read_cluster``.
On a GPU, the tiers would be device memory and pinned host memory and the copies CUDA kernels
(a later issue); this module runs on NumPy arrays only.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import numba as nb
import numpy as np

from retrokv.reference import wave_buffer as _ref
from retrokv.reference.wave_buffer import (BufferState, DeviceTier, HostTier, StepResult, empty_tiers,  # not hot
                                           capacity_blocks, extend_device_tier, extend_host_tier, read_cluster)
from retrokv.reference.wave_index import ExecBuffer

from ._dispatch import require_numpy
from ._wave_exact import buffer_arrays  # the index's reused execution-buffer arrays

__all__ = ["HostTier", "DeviceTier", "BufferState", "StepResult", "empty_state", "extend_host_tier",
           "extend_device_tier", "capacity_blocks", "sync_state", "plan_step", "fill_execution_buffer",
           "scatter_admitted", "gather_step", "read_cluster", "lru_order", "used_blocks"]


class Table(NamedTuple):
    """The fast control plane: the cluster mapping table, free stacks and LRU links as arrays."""

    cached: np.ndarray      # (Hkv, C) bool
    block_of: np.ndarray    # (Hkv, HB) int64, -1: host block not cached
    free: np.ndarray        # (Hkv, cap) int64 stack of free device blocks; top = free[h, n_free[h] - 1]
    n_free: np.ndarray      # (Hkv,) int64
    prev: np.ndarray        # (Hkv, C) int64 towards the least recent, -1 at the end
    nxt: np.ndarray         # (Hkv, C) int64 towards the most recent, -1 at the end
    ends: np.ndarray        # (Hkv, 2) int64 (least recent, most recent), -1 when empty


def empty_state(hkv, d, dv, block_size):
    """A buffer with no clusters and no cache blocks."""
    z = np.zeros
    host, device = empty_tiers(hkv, d, dv, block_size)
    table = Table(z((hkv, 0), bool), z((hkv, 0), np.int64), z((hkv, 0), np.int64), z(hkv, np.int64),
                  z((hkv, 0), np.int64), z((hkv, 0), np.int64), np.full((hkv, 2), -1, np.int64))
    return BufferState(host, device, table)


def _pad(x, cols, fill):
    out = np.full((x.shape[0], cols), fill, x.dtype)
    out[:, :x.shape[1]] = x
    return out


def sync_state(state, meta, cache_fraction):
    """Same contract as :func:`retrokv.reference.wave_buffer.sync_state`."""
    host = extend_host_tier(state.host, meta)
    cap_old = state.device.keys.shape[1]
    cap = max(cap_old, capacity_blocks(host, cache_fraction))
    device = extend_device_tier(state.device, cap)
    t = state.table
    c, hb = host.sizes.shape[1], host.keys.shape[1]
    free = _pad(t.free, cap, -1)
    n_free = t.n_free.copy()
    for h in range(len(n_free)):        # new block ids go on top, lowest first out (as the reference)
        new = np.arange(cap - 1, cap_old - 1, -1)
        free[h, n_free[h]:n_free[h] + len(new)] = new
        n_free[h] += len(new)
    table = Table(_pad(t.cached, c, False), _pad(t.block_of, hb, -1), free, n_free, _pad(t.prev, c, -1),
                  _pad(t.nxt, c, -1), t.ends.copy())
    return BufferState(host, device, table)


@nb.njit(cache=True, inline="always")
def _unlink(prev, nxt, ends, h, x):
    p, n = prev[h, x], nxt[h, x]
    if p >= 0:
        nxt[h, p] = n
    else:
        ends[h, 0] = n
    if n >= 0:
        prev[h, n] = p
    else:
        ends[h, 1] = p
    prev[h, x] = -1
    nxt[h, x] = -1


@nb.njit(cache=True, inline="always")
def _push_recent(prev, nxt, ends, h, x):
    t = ends[h, 1]
    prev[h, x] = t
    nxt[h, x] = -1
    if t >= 0:
        nxt[h, t] = x
    else:
        ends[h, 0] = x
    ends[h, 1] = x


@nb.njit(cache=True)
def _plan(cached, block_of, free, n_free, prev, nxt, ends, start, n_blocks, retrieval, hit, admitted, evicted):
    hkv, r = retrieval.shape
    in_step = np.zeros(cached.shape[1], np.bool_)
    n_ev = 0
    for h in range(hkv):
        for j in range(r):
            in_step[retrieval[h, j]] = True
            hit[h, j] = cached[h, retrieval[h, j]]                     # 1. lookup
        for j in range(r):                                             # 2. admission, in rank order
            if hit[h, j]:
                continue
            i = retrieval[h, j]
            need = n_blocks[h, i]
            evictable = 0
            x = ends[h, 0]
            while x >= 0:
                if not in_step[x]:
                    evictable += n_blocks[h, x]
                x = nxt[h, x]
            if n_free[h] + evictable < need:
                continue                                               # bypass
            while n_free[h] < need:
                v = ends[h, 0]
                while in_step[v]:                                      # least recent outside the step
                    v = nxt[h, v]
                s = start[h, v]
                for b in range(n_blocks[h, v] - 1, -1, -1):            # the reference's push order
                    free[h, n_free[h]] = block_of[h, s + b]
                    n_free[h] += 1
                    block_of[h, s + b] = -1
                cached[h, v] = False
                _unlink(prev, nxt, ends, h, v)
                evicted[n_ev, 0] = h
                evicted[n_ev, 1] = v
                n_ev += 1
            s = start[h, i]
            for b in range(need):
                n_free[h] -= 1
                block_of[h, s + b] = free[h, n_free[h]]
            cached[h, i] = True
            _push_recent(prev, nxt, ends, h, i)
            admitted[h, j] = True
        for j in range(r - 1, -1, -1):                                 # 3. recency: best-ranked last
            i = retrieval[h, j]
            if cached[h, i]:
                _unlink(prev, nxt, ends, h, i)
                _push_recent(prev, nxt, ends, h, i)
        for j in range(r):
            in_step[retrieval[h, j]] = False
    return n_ev


def plan_step(state, retrieval):
    """Same contract as :func:`retrokv.reference.wave_buffer.plan_step`; one Numba pass over the table."""
    require_numpy("plan_step", retrieval)
    t, host = state.table, state.host
    retrieval = np.ascontiguousarray(retrieval, dtype=np.int64)
    hit = np.zeros(retrieval.shape, np.bool_)
    admitted = np.zeros(retrieval.shape, np.bool_)
    # a head evicts at most every cluster it holds plus those it admits in this step
    evicted = np.empty((retrieval.shape[0] * (t.cached.shape[1] + 1), 2), np.int64)
    n = _plan(t.cached, t.block_of, t.free, t.n_free, t.prev, t.nxt, t.ends, host.start, host.n_blocks,
              retrieval, hit, admitted, evicted)
    return StepResult(hit, admitted, evicted[:n].copy())


@nb.njit(parallel=True, cache=True)
def _fill(bk, bv, bids, steady_k, steady_v, steady_ids, hk, hv, hids, dk, dv_, dids, block_of, start, sizes,
          retrieval, hit, dst):
    hkv, s, d = steady_k.shape
    dv = steady_v.shape[2]
    r = retrieval.shape[1]
    bsz = hk.shape[2]
    for item in nb.prange(hkv * (r + 1)):
        h = item // (r + 1)
        j = item % (r + 1)
        if j == r:                                                     # the steady zone goes first
            for t in range(s):
                bids[h, t] = steady_ids[t]
                bk[h, t] = steady_k[h, t]
                bv[h, t] = steady_v[h, t]
            continue
        i = retrieval[h, j]
        for t in range(sizes[h, i]):
            hb = start[h, i] + t // bsz
            slot = t % bsz
            row = dst[h, j] + t
            if hit[h, j]:                                              # device tier
                blk = block_of[h, hb]
                bids[h, row] = dids[h, blk, slot]
                for x in range(d):
                    bk[h, row, x] = dk[h, blk, slot, x]
                for x in range(dv):
                    bv[h, row, x] = dv_[h, blk, slot, x]
            else:                                                      # host tier: crosses PCIe on a GPU
                bids[h, row] = hids[h, hb, slot]
                for x in range(d):
                    bk[h, row, x] = hk[h, hb, slot, x]
                for x in range(dv):
                    bv[h, row, x] = hv[h, hb, slot, x]


def fill_execution_buffer(state, steady_k, steady_v, steady_ids, retrieval, hit, workspace=None):
    """Same contract as the reference; rows past ``lengths[h]`` are left unset."""
    require_numpy("fill_execution_buffer", steady_k, steady_v)
    host, dev = state.host, state.device
    hkv, s, d = steady_k.shape
    dv = steady_v.shape[2]
    retrieval = np.ascontiguousarray(retrieval, dtype=np.int64)
    sizes = np.take_along_axis(host.sizes, retrieval, axis=1)              # (Hkv, r)
    ends = s + np.cumsum(sizes, axis=1)
    dst = np.ascontiguousarray(ends - sizes)
    lengths = (ends[:, -1] if retrieval.shape[1] else np.full(hkv, s)).astype(np.int64)
    bk, bv, bids = buffer_arrays(hkv, int(lengths.max(initial=0)), d, dv, workspace)
    _fill(bk, bv, bids, np.ascontiguousarray(steady_k, np.float32), np.ascontiguousarray(steady_v, np.float32),
          np.ascontiguousarray(steady_ids, np.int64), host.keys, host.values, host.ids, dev.keys, dev.values,
          dev.ids, state.table.block_of, host.start, host.sizes, retrieval, np.ascontiguousarray(hit), dst)
    return ExecBuffer(bk, bv, bids, lengths)


@nb.njit(parallel=True, cache=True)
def _scatter(dk, dv, dids, hk, hv, hids, block_of, start, n_blocks, heads, clusters):
    for a in nb.prange(heads.shape[0]):
        h, i = heads[a], clusters[a]
        for b in range(start[h, i], start[h, i] + n_blocks[h, i]):
            blk = block_of[h, b]
            dk[h, blk] = hk[h, b]
            dv[h, blk] = hv[h, b]
            dids[h, blk] = hids[h, b]


def scatter_admitted(state, retrieval, admitted):
    """Same contract as the reference: admitted clusters' host blocks into their device blocks."""
    hs, js = np.nonzero(admitted)
    if len(hs) == 0:
        return
    host, dev = state.host, state.device
    _scatter(dev.keys, dev.values, dev.ids, host.keys, host.values, host.ids, state.table.block_of, host.start,
             host.n_blocks, hs.astype(np.int64), np.asarray(retrieval, np.int64)[hs, js])


def gather_step(state, steady_k, steady_v, steady_ids, retrieval, workspace=None, ops=None):
    """The reference driver :func:`retrokv.reference.wave_buffer.gather_step` with this module's kernels."""
    return _ref.gather_step(state, steady_k, steady_v, steady_ids, retrieval, workspace,
                            ops=sys.modules[__name__] if ops is None else ops)


def lru_order(state, h):
    """Cached cluster ids of head ``h``, least recently used first."""
    t, out = state.table, []
    x = t.ends[h, 0]
    while x >= 0:
        out.append(x)
        x = t.nxt[h, x]
    return np.array(out, dtype=np.int64)


def used_blocks(state):
    """Cache blocks in use per head ``(Hkv,)``."""
    return state.device.keys.shape[1] - state.table.n_free
