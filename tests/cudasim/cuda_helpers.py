"""Helpers of the cudasim ring: the array module under test, a float64 attention oracle, the tolerance rule."""
from __future__ import annotations

import os

import numpy as np

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _gpu_available():
    if SIMULATOR:
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:       # no CuPy, or CuPy without a driver
        return False


GPU = _gpu_available()


def upto(sim_max, gpu_max):
    """A size bound: small under the simulator (every CUDA thread is a Python thread), large on a GPU, where
    the launch geometry is 128 threads, 128-key tiles and chunks of >= 256 keys: only sizes past those
    exercise several tiles, chunks and blocks per head."""
    return gpu_max if GPU else sim_max


class Arrays:
    """The array module a test runs on: NumPy under the simulator, CuPy on a GPU."""

    def __init__(self, name):
        self.name = name
        self.m = np if name == "numpy" else __import__("cupy")

    def dev(self, x):
        """A test input on the device (unchanged under the simulator)."""
        return self.m.asarray(x)

    @staticmethod
    def host(x):
        """A result back on the host as NumPy."""
        return x.get() if type(x).__module__.split(".")[0] == "cupy" else np.asarray(x)

    @property
    def exact(self):
        """Under the simulator NumPy does the array work, so some results match the reference bit for bit."""
        return self.name == "numpy"


def oracle(q, k, v, causal=False, scale=None):
    """Float64 attention written the plain way: ``(out, lse)``, the ground truth."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    decode = q.ndim == 2
    q3 = q[:, None] if decode else q
    hq, t, d = q3.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    scale = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros((hq, t, v.shape[-1]))
    lse = np.full((hq, t), -np.inf)
    for h in range(hq):
        for i in range(t):
            limit = n - t + i + 1 if (causal and not decode) else n
            if limit <= 0:
                continue
            s = k[h // g, :limit] @ q3[h, i] * scale
            mx = s.max()
            p = np.exp(s - mx)
            out[h, i] = p @ v[h // g, :limit] / p.sum()
            lse[h, i] = mx + np.log(p.sum())
    return (out[:, 0], lse[:, 0]) if decode else (out, lse)


def assert_flash_tolerance(got, ref, exact):
    """FlashAttention-style: the error against the float64 ``exact`` is at most 4x the reference's own
    error plus a float32 floor (the rule of ``tests/test_attention.py``); empty rows agree (-inf)."""
    (o, l), (ro, rl), (o64, l64) = got, ref, exact
    assert o.shape == ro.shape and l.shape == rl.shape
    assert np.array_equal(np.isneginf(l), np.isneginf(l64))
    fin = np.isfinite(l64)
    ulp = 4 * np.finfo(np.float32).eps
    assert np.abs(o - o64).max(initial=0) <= 4 * np.abs(ro - o64).max(initial=0) + ulp
    assert np.abs(l[fin] - l64[fin]).max(initial=0) <= \
        4 * np.abs(rl[fin] - l64[fin]).max(initial=0) + ulp * (1 + np.abs(l64[fin]).max(initial=0))
