"""Array-type dispatch for the fast backend: NumPy arrays run Numba kernels, CuPy arrays CUDA kernels.

Nothing falls back silently from the GPU to the CPU: a CuPy array reaching a function without a CUDA
kernel raises instead of being copied to the host. The functions that the papers themselves run on
the CPU say so in the error (:data:`CPU_BY_PAPER`).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import numpy as np

_GRAPH = ("RetrievalAttention (arXiv 2409.10516, §3.3) builds and searches its graph on the CPU over KV "
          "offloaded to host memory, while the GPU attends the static tokens; combine the two with "
          "retrokv.fast.cuda.graph_index.co_attention")
_LRU = ("RetroInfer (arXiv 2505.02922, §4.4) keeps the wave buffer's control plane (mapping table, LRU) "
        "on the CPU; retrokv.fast.cuda.wave_buffer runs it there and moves only cluster ids")

# fn -> why the paper runs it on the CPU
CPU_BY_PAPER = {**{fn: _GRAPH for fn in ("knn", "key_neighbors", "prune", "project", "add_reverse_edges",
                                         "enhance", "connect", "build_graph", "graph_search")},
                "plan_step": _LRU}


def is_cupy(x) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def any_cupy(*arrays) -> bool:
    """True when any argument is a CuPy array: the call belongs to :mod:`retrokv.fast.cuda`."""
    return any(is_cupy(a) for a in arrays)


def cuda(name):
    """The CUDA module ``retrokv.fast.cuda.<name>``, imported on first use (numba.cuda, no CuPy import)."""
    return importlib.import_module(f"retrokv.fast.cuda.{name}")


def require_numpy(fn: str, *arrays) -> None:
    """Raise ``TypeError`` if any argument is a CuPy array (``fn`` runs on the CPU) or not a NumPy array."""
    for a in arrays:
        if is_cupy(a):
            if fn in CPU_BY_PAPER:
                raise TypeError(f"retrokv.fast.{fn} runs on the CPU by design: {CPU_BY_PAPER[fn]}; "
                                "pass NumPy arrays (cupy.asnumpy)")
            raise TypeError(f"retrokv.fast.{fn} got a CuPy array but has no CUDA kernel in this build; "
                            "pass NumPy arrays (cupy.asnumpy) or use backend='reference'")
        if not isinstance(a, (np.ndarray, np.generic, list, tuple, int, float)):
            raise TypeError(f"retrokv.fast.{fn} expected NumPy arrays, got {type(a).__name__}")


# Multiply-adds below which a decode kernel runs on the calling thread alone. A parallel region
# costs a wake-up and a barrier; a decode step of a sparse index is a few hundred microseconds of
# work split over ~10 such regions, and whenever a worker thread is not on a core (another process,
# or torch's own OpenMP threads still spinning after the model's matmuls) the barrier waits a whole
# scheduler slice. Measured in benchmarks/decode_speed.py (docs/wave_index.md).
PARALLEL_MIN_WORK = 1 << 22


@contextmanager
def threads_for(work):
    """Run the Numba kernels inside on one thread when ``work`` (multiply-adds) is below
    :data:`PARALLEL_MIN_WORK`; otherwise on all of Numba's threads. Thread-local, restored on exit."""
    import numba as nb

    old = nb.get_num_threads()
    if work >= PARALLEL_MIN_WORK or old == 1:
        yield
        return
    nb.set_num_threads(1)
    try:
        yield
    finally:
        nb.set_num_threads(old)


_BLAS = []     # one threadpoolctl controller, made on first use (it lists the loaded libraries once)


@contextmanager
def blas_one_thread():
    """Run the BLAS calls inside on the calling thread alone (OpenBLAS, MKL, BLIS via threadpoolctl).

    After a multithreaded call OpenBLAS's workers spin for ~0.1 s (its ``THREAD_TIMEOUT``) before they
    sleep; a Numba parallel kernel that follows a small BLAS call then shares the cores with them. In
    the graph build (a small matmul, then the parallel IVF scan, per query head) that cost a quarter of
    the build on 2 cores (benchmarks/results/graph_build.md). Without threadpoolctl: no change.
    """
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:           # an optional speed-up: the results are the same without it
            _BLAS.append(None)
        else:
            _BLAS.append(ThreadpoolController())
    if _BLAS[0] is None:
        yield
        return
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield
