"""RetroInfer's wave buffer, public face: :class:`WaveBuffer` and :class:`WaveBufferStats`.

``buffer = WaveBuffer(index, cache_fraction=0.05)`` puts a two-tier KV store behind a
:class:`~retrokv.wave_index.WaveIndex` (RetroInfer §4.3-4.4): the host tier holds every cluster's KV in
fixed-size blocks, the device tier a block cache sized as a fraction of it, managed by LRU.
``index.attend(q, buffer=buffer)`` then reads the retrieved clusters through the buffer: the result
is the same as without it, and :attr:`WaveBuffer.stats` says how much of it came from the cache and
how many bytes crossed from host to device. The algorithms live in
``retrokv.reference.wave_buffer`` / ``retrokv.fast.wave_buffer``; this module holds the state,
validates inputs, counts and picks the backend.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np

from . import _validate as V
from ._xp import check_device, is_cupy, to_host
from .backend import impl
from .wave_index import WaveIndex

__all__ = ["WaveBuffer", "WaveBufferStats"]


@dataclass(frozen=True)
class WaveBufferStats:
    """One :meth:`WaveBuffer.gather` step and the running totals. Counts are clusters summed over KV heads.

    ``hit_ratio`` is ``hits / retrieved`` for this step (``nan`` when nothing was retrieved);
    ``bytes_h2d`` counts the keys and values of the misses, the only data that crosses from host to
    device; ``bytes_no_cache`` is what the same step would move with no cache (every retrieved cluster).
    """

    step: int                    # 1 for the first gather
    retrieved: int               # clusters in the retrieval zone
    hits: int                    # read from the device tier
    misses: int                  # read from the host tier
    admitted: int                # misses that entered the cache
    evicted: int                 # clusters evicted to make room
    hit_ratio: float
    bytes_h2d: int
    bytes_no_cache: int
    cache_blocks_used: int       # summed over heads, after the step
    cache_blocks: int            # capacity summed over heads
    occupancy: float             # cache_blocks_used / cache_blocks (0 for a zero-size cache)
    total_hits: int
    total_misses: int
    cumulative_hit_ratio: float
    total_bytes_h2d: int
    total_bytes_no_cache: int
    seconds_control: float       # lookup, admission, eviction, LRU (the CPU control plane)
    seconds_copy: float          # filling the execution buffer and scattering admitted blocks

    def as_dict(self):
        return asdict(self)


class WaveBuffer:
    """A two-tier KV store with an LRU block cache behind one :class:`~retrokv.wave_index.WaveIndex` (RetroInfer §4.3-4.4).

    Args:
        index: the :class:`~retrokv.wave_index.WaveIndex` whose clusters the buffer holds. Clusters that
            ``index.append`` adds later enter the host tier at the next :meth:`gather`.
        cache_fraction: size of the device block cache as a fraction of the host tier's blocks, in
            ``[0, 1]`` (RetroInfer: 5%). ``0`` gives no cache: every retrieved cluster is a miss.
            The cache grows with the index, never shrinks.
        block_size: vectors per block (RetroInfer: 8, i.e. 2 KB at d=128 in fp16).
        backend: ``"reference"`` or ``"fast"``; default: the index's backend.
        device: ``None`` (the index's device), ``"cpu"`` or ``"cuda"``; it must be the index's.

    On the CPU both tiers are NumPy arrays. With ``device="cuda"`` (RetroInfer §4.3-4.4, as the paper
    places them) the device tier (block cache and the device copy of the mapping table) is in device
    memory, the host tier in pinned host memory that the fill kernel reads misses from over PCIe, and
    the control plane (lookup, admission, LRU eviction) stays on the CPU; admitted misses are copied
    into the cache from the execution buffer, device to device
    (:mod:`retrokv.fast.cuda.wave_buffer`).
    """

    def __init__(self, index, cache_fraction=0.05, block_size=8, backend=None, *, device: str | None = None):
        if not isinstance(index, WaveIndex):
            raise TypeError(f"index must be a WaveIndex, got {type(index).__name__}")
        if isinstance(cache_fraction, bool) or not isinstance(cache_fraction, Real):
            raise TypeError(f"cache_fraction must be a float in [0, 1], got {type(cache_fraction).__name__}")
        if not math.isfinite(cache_fraction) or not 0.0 <= cache_fraction <= 1.0:
            raise ValueError(f"cache_fraction must be a float in [0, 1], got {cache_fraction!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, Integral):
            raise TypeError(f"block_size must be an int >= 1, got {type(block_size).__name__}")
        if block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.index = index                       # WaveIndex.attend checks `buffer.index is self`
        self.cache_fraction, self.block_size = float(cache_fraction), int(block_size)
        self.backend = index.backend if backend is None else backend
        device = index.device if check_device(device) is None else device
        if device != index.device:
            raise ValueError(f"device={device!r} differs from the index's device {index.device!r}: the buffer "
                             "serves the index's execution buffer, so both live on one device")
        self.device = device
        self._mod = impl(self.backend, "wave_buffer", device)   # validates the name
        self.backend = self._mod.__name__.split(".")[1]
        hkv, d, dv = index.shape
        self._state = self._mod.sync_state(self._mod.empty_state(hkv, d, dv, self.block_size), index.meta,
                                           self.cache_fraction)
        self.stats = None
        self.history = []
        self.last_step = None
        self._totals = dict(hits=0, misses=0, bytes_h2d=0, bytes_no_cache=0)

    # ------------------------------------------------------------------ properties
    @property
    def n_clusters(self):
        """Clusters in the host tier."""
        return self._state.host.sizes.shape[1]

    @property
    def host_blocks(self):
        """Host-tier blocks per head (the largest head's)."""
        h = self._state.host
        return int((h.start[:, -1] + h.n_blocks[:, -1]).max()) if self.n_clusters else 0

    @property
    def capacity_blocks(self):
        """Device cache blocks per head."""
        return self._state.device.keys.shape[1]

    @property
    def state(self):
        """The backend's :class:`~retrokv.reference.wave_buffer.BufferState` (host tier, device tier, table)."""
        return self._state

    def cached_clusters(self, h):
        """Cluster ids of head ``h`` held in the device cache, least recently used first."""
        return self._mod.lru_order(self._state, h)

    def read_cluster(self, h, i):
        """``(keys, values, ids)`` of cluster ``i`` of head ``h``, from the tier that holds it."""
        h = V.check_index(h, "h", self._state.host.sizes.shape[0], "a KV head")
        i = V.check_index(i, "i", self.n_clusters, "a cluster")   # 1.5 or True must not reach NumPy indexing
        return self._mod.read_cluster(self._state, h, i)

    # ------------------------------------------------------------------ the step
    def _sync(self):
        if self.index.n_clusters != self.n_clusters:
            self._state = self._mod.sync_state(self._state, self.index.meta, self.cache_fraction)

    def gather(self, retrieval, workspace=None):
        """The execution buffer ``[steady | retrieved clusters]`` for ``retrieval (Hkv, r)`` (cluster
        ids in rank order), read through the cache; updates the cache and :attr:`stats`.

        Returns the same :class:`~retrokv.reference.wave_index.ExecBuffer` as
        ``gather_execution_buffer``; :meth:`WaveIndex.attend` calls it when given ``buffer=``.
        Sets :attr:`stats` (a :class:`WaveBufferStats`, also appended to :attr:`history`) and
        :attr:`last_step` (the :class:`~retrokv.reference.wave_buffer.StepResult`: which clusters hit,
        which misses were admitted, which clusters were evicted). Without ``workspace`` (the index's
        reused arrays, which :meth:`WaveIndex.attend` passes) the buffer returned is the caller's own.
        """
        self._sync()
        # the control plane reads the ids on the CPU (RetroInfer §4.4): Hkv x r integers cross over
        retrieval = to_host(retrieval) if is_cupy(retrieval) else np.asarray(retrieval)
        hkv = self._state.host.sizes.shape[0]
        if retrieval.ndim != 2 or retrieval.shape[0] != hkv or retrieval.dtype.kind not in "iu":
            raise ValueError(f"retrieval must be an int array of shape (Hkv={hkv}, r), "
                             f"got {retrieval.dtype} array of shape {tuple(retrieval.shape)}")
        retrieval = np.ascontiguousarray(retrieval, dtype=np.int64)
        if retrieval.size and (retrieval.min() < 0 or retrieval.max() >= self.n_clusters):
            raise ValueError(f"retrieval holds cluster ids outside [0, {self.n_clusters})")
        if any(len(set(r.tolist())) != len(r) for r in retrieval):
            raise ValueError("retrieval must not repeat a cluster within a head")
        sk, sv, sids = self.index.steady
        t0 = time.perf_counter()
        res = self._mod.plan_step(self._state, retrieval)
        t1 = time.perf_counter()
        buf = self._mod.fill_execution_buffer(self._state, sk, sv, sids, retrieval, res.hit, workspace)
        if hasattr(self._mod, "scatter_from_buffer"):       # GPU: admitted misses device to device (§4.4)
            self._mod.scatter_from_buffer(self._state, retrieval, res.admitted, buf, sk.shape[1])
        else:
            self._mod.scatter_admitted(self._state, retrieval, res.admitted)
        t2 = time.perf_counter()
        self.last_step = res
        self.stats = self._count(retrieval, res, t1 - t0, t2 - t1)
        self.history.append(self.stats)
        return buf

    def _count(self, retrieval, res, t_control, t_copy):
        host = self._state.host
        per_vec = 4 * (host.keys.shape[3] + host.values.shape[3])      # float32 key + value
        sizes = np.take_along_axis(host.sizes, retrieval, axis=1)        # (Hkv, r)
        hits, n = int(res.hit.sum()), retrieval.size
        tot = self._totals
        tot["hits"] += hits
        tot["misses"] += n - hits
        b_h2d, b_all = int(sizes[~res.hit].sum()) * per_vec, int(sizes.sum()) * per_vec
        tot["bytes_h2d"] += b_h2d
        tot["bytes_no_cache"] += b_all
        used = int(self._mod.used_blocks(self._state).sum())
        cap = self.capacity_blocks * host.sizes.shape[0]
        seen = tot["hits"] + tot["misses"]
        return WaveBufferStats(
            step=len(self.history) + 1, retrieved=n, hits=hits, misses=n - hits, admitted=int(res.admitted.sum()),
            evicted=len(res.evicted), hit_ratio=hits / n if n else float("nan"), bytes_h2d=b_h2d,
            bytes_no_cache=b_all, cache_blocks_used=used, cache_blocks=cap, occupancy=used / cap if cap else 0.0,
            total_hits=tot["hits"], total_misses=tot["misses"],
            cumulative_hit_ratio=tot["hits"] / seen if seen else float("nan"),
            total_bytes_h2d=tot["bytes_h2d"], total_bytes_no_cache=tot["bytes_no_cache"],
            seconds_control=t_control, seconds_copy=t_copy)

    def __repr__(self):
        hkv = self._state.host.sizes.shape[0]
        hr = "n/a" if self.stats is None else f"{self.stats.cumulative_hit_ratio:.3f}"
        return (f"WaveBuffer(Hkv={hkv}, clusters={self.n_clusters}, host_blocks={self.host_blocks}, "
                f"cache_blocks={self.capacity_blocks} ({self.cache_fraction:.1%}), block_size={self.block_size}, "
                f"steps={len(self.history)}, hit_ratio={hr}, backend={self.backend!r}, device={self.device!r})")
