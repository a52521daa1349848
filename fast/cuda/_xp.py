"""The array-namespace helper of the CUDA path: one module, two array libraries.

``xp(*arrays)`` is :mod:`cupy` when any input is a CuPy array and :mod:`numpy` otherwise; CuPy is
imported only when a CuPy array is seen, so this package imports on a machine with no CUDA at all.
Array-level work (GEMMs, sorts, cumulative sums, fancy indexing) goes through ``xp``; the kernels
are ``numba.cuda.jit`` functions, which take CuPy arrays on a GPU (the CUDA array interface) and
NumPy arrays under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``). That is why the same
module is tested on a CPU and timed on a GPU.

Launch geometry is the one thing that differs between the two: the simulator runs every CUDA
thread as a Python thread and every ``syncthreads`` as a barrier between them, so it gets few threads
per block, short key tiles and few key chunks (the kernels take these as arguments; their logic,
strides and tile boundaries are exercised all the same). A GPU gets 128 threads, 128-key tiles and
enough chunks to fill its SMs.
"""
from __future__ import annotations

import numba
import numpy as np

__all__ = ["SIMULATOR", "MAX_TILE", "MAX_D", "is_cupy", "xp", "asnumpy", "float_array", "geometry", "split", "launch",
           "argsort_stable", "device_xp", "pinned_copy"]

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

# numba-cuda (0.30 seen) registers an overload of ``np.row_stack`` when it compiles its first kernel; NumPy 2.5
# removed that alias of ``vstack``, so on such an install every kernel compile raised AttributeError (seen on
# the lent H200's image: NumPy 2.5.2, numba-cuda 0.30.4). Restoring the alias is all numba-cuda needs.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

# Largest shared-memory tile (keys or clusters) any kernel declares; launch tiles and threads are <= this.
MAX_TILE = 128
# Largest head dimension kept in shared memory (queries staged once per block).
MAX_D = 512


def is_cupy(x) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def xp(*arrays):
    """:mod:`cupy` if any of ``arrays`` is a CuPy array, else :mod:`numpy` (never imports CuPy otherwise)."""
    if any(is_cupy(a) for a in arrays):
        import cupy

        return cupy
    return np


def asnumpy(x):
    """A host (NumPy) copy of ``x``: the few small control-plane arrays that the CPU must read."""
    return x.get() if is_cupy(x) else np.asarray(x)


def float_array(m, x, keep_half=False):
    """``x`` as a C-contiguous float32 array of namespace ``m`` (float16 kept when ``keep_half``: storage only)."""
    x = m.asarray(x)
    if keep_half and x.dtype == np.float16:
        return m.ascontiguousarray(x)
    return m.ascontiguousarray(x, dtype=np.float32)


class Geometry:
    """Launch sizes: ``threads`` per block, ``tile`` keys per shared-memory tile, ``blocks`` to aim for."""

    def __init__(self, threads, tile, blocks, min_chunk):
        self.threads, self.tile, self.blocks, self.min_chunk = threads, tile, blocks, min_chunk


_GEOMETRY = None


def geometry():
    """The launch sizes for this process: small under the simulator, GPU-filling on a device."""
    global _GEOMETRY
    if _GEOMETRY is None:
        if SIMULATOR:
            _GEOMETRY = Geometry(threads=4, tile=16, blocks=4, min_chunk=8)
        else:
            from numba import cuda

            # Numba synchronises the host with the stream of every CuPy array it receives (a full stall per
            # kernel argument) unless told not to. CuPy's work and these kernels all run on the legacy
            # default stream, which orders them already, so the stall buys nothing.
            numba.config.CUDA_ARRAY_INTERFACE_SYNC = False
            sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
            # 4 resident blocks per SM hide the latency of the key reads; chunks of >= 256 keys
            # keep the partial (m, l, acc) traffic small next to the K/V reads.
            _GEOMETRY = Geometry(threads=128, tile=MAX_TILE, blocks=4 * sms, min_chunk=256)
    return _GEOMETRY


def split(n, rows):
    """``(n_chunks, chunk)``: cut ``n`` keys so that ``rows * n_chunks`` blocks about fill the device."""
    g = geometry()
    want = max(1, -(-g.blocks // max(rows, 1)))
    n_chunks = max(1, min(want, -(-n // g.min_chunk)))
    chunk = max(1, -(-n // n_chunks))
    return n_chunks, chunk


def launch(kernel, n_blocks, *args, threads=None):
    """Run ``kernel`` on a 1-D grid of ``n_blocks`` blocks; no launch at all when there is no work."""
    if n_blocks <= 0:
        return
    kernel[int(n_blocks), int(threads or geometry().threads)](*args)


def argsort_stable(m, a, axis=-1):
    """Stable argsort along ``axis`` (CuPy's argsort is always stable and rejects ``kind``)."""
    return np.argsort(a, axis=axis, kind="stable") if m is np else m.argsort(a, axis=axis)


def device_xp():
    """The namespace of device arrays the GPU path allocates itself: CuPy on a GPU, NumPy under the simulator."""
    if SIMULATOR:
        return np
    import cupy

    return cupy


def pinned_copy(x):
    """``x`` copied into page-locked host memory mapped into the device's address space (zero-copy).

    A kernel reads such an array directly over PCIe, which is how RetroInfer's gather kernel reads
    cache misses from the host tier (§4.4). Under the simulator it is a plain NumPy copy.
    """
    x = np.ascontiguousarray(x)
    if SIMULATOR or x.size == 0:    # cuMemHostAlloc(0) maps no pointer (CUDA_ERROR_INVALID_VALUE, seen on an H200)
        return x.copy()
    from numba import cuda

    out = cuda.mapped_array(x.shape, x.dtype)
    out[...] = x
    return out
