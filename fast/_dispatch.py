"""Array-type dispatch for the fast backend: NumPy arrays run Numba kernels, CuPy arrays CUDA kernels.

Nothing falls back silently from the GPU to the CPU: a CuPy array reaching a function that has no
CUDA kernel raises instead of being copied to the host.
"""
from __future__ import annotations

import numpy as np


def is_cupy(x) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def require_numpy(fn: str, *arrays) -> None:
    """Raise ``TypeError`` if any argument is a CuPy array: ``fn`` has no CUDA kernel."""
    for a in arrays:
        if is_cupy(a):
            raise TypeError(
                f"retrokv.fast.{fn} got a CuPy array but has no CUDA kernel in this build; "
                "pass NumPy arrays (cupy.asnumpy) or use backend='reference'"
            )
        if not isinstance(a, (np.ndarray, np.generic, list, tuple, int, float)):
            raise TypeError(f"retrokv.fast.{fn} expected NumPy arrays, got {type(a).__name__}")
