"""Rotary position embedding on the GPU: one kernel with the angles and the rotation fused.

Same names and contract as ``reference/rope.py`` (RoFormer Eq. 34, HF Llama's ``rotate_half``
pairing or the interleaved one). One block per row of ``x`` (a head at a position), threads over the
``d/2`` coordinate pairs. Each thread forms its angle in float32, ``pos * inv_freq[i]``, exactly as
transformers does, evaluates ``cos``/``sin`` in float64 and rounds them once to float32 (the
reference's rule, so every backend sees the same table), and writes ``x * cos + rotate_half(x) * sin``.
Under the CUDA simulator the result is bit-identical to the reference; on a GPU the compiler may
fuse the multiply-add, which can move the last bit.

``rope_inv_freq``, ``rope_cos_sin`` and ``rotate_half`` are small tables or array expressions: they are
the reference's (``rotate_half`` through ``xp`` so a CuPy array stays on the device).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64

from retrokv.reference.rope import rope_cos_sin, rope_inv_freq  # tables: not hot

from ._xp import float_array, launch, xp

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "rotate_by", "rotate_half"]


@cuda.jit
def _rope_kernel(x, pos, inv_freq, interleaved, out):
    """Block ``r``: row ``r`` of ``x (R, d)`` rotated to ``pos[r]``; thread ``i`` turns pair ``i``."""
    r = cuda.blockIdx.x
    half = x.shape[1] // 2
    for i in range(cuda.threadIdx.x, half, cuda.blockDim.x):
        ang = float32(pos[r] * inv_freq[i])                   # float32 angle, as transformers
        c = float32(math.cos(float64(ang)))                   # evaluated in float64, rounded once
        s = float32(math.sin(float64(ang)))
        if interleaved:
            a = x[r, 2 * i]
            b = x[r, 2 * i + 1]
            out[r, 2 * i] = a * c + (-b) * s
            out[r, 2 * i + 1] = b * c + a * s
        else:
            a = x[r, i]
            b = x[r, i + half]
            out[r, i] = a * c + (-b) * s
            out[r, i + half] = b * c + a * s


def rotate_half(x):
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis (HF Llama), in ``x``'s namespace."""
    m = xp(x)
    half = x.shape[-1] // 2
    return m.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, theta=10000.0, convention="half"):
    """Same contract as :func:`retrokv.reference.rope.apply_rope`; one fused kernel."""
    m = xp(x, positions)
    x = float_array(m, x)
    d = x.shape[-1]
    pos = m.broadcast_to(m.asarray(positions), x.shape[:-1]).astype(np.float32).reshape(-1)
    rows = m.ascontiguousarray(x.reshape(-1, d))                         # (R, d)
    out = m.empty_like(rows)
    launch(_rope_kernel, rows.shape[0], rows, m.ascontiguousarray(pos), m.asarray(rope_inv_freq(d, theta)),
           convention == "interleaved", out)
    return out.reshape(x.shape)


def rotate_by(x_rot, delta, theta=10000.0, convention="half"):
    """Same contract as :func:`retrokv.reference.rope.rotate_by`: ``R(delta) R(p) = R(p + delta)``."""
    return apply_rope(x_rot, delta, theta, convention)
