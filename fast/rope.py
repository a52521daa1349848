"""Rotary position embedding, fast path: one Numba pass with the rotation and its angles fused.

Same names and bit-identical results as ``reference/rope.py``: the angle is formed in float32
(``position * inv_freq``), its cos/sin evaluated in float64 and rounded once, and the rotation is
``x * cos + rotate_half(x) * sin`` in float32 without fused multiply-adds (no ``fastmath``), so the
bits match the reference and transformers' ``apply_rotary_pos_emb``.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from retrokv.reference.rope import rope_cos_sin, rope_inv_freq, rotate_half  # not hot: tables and helpers

from ._dispatch import any_cupy, cuda, require_numpy

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "rotate_by", "rotate_half"]


@nb.njit(parallel=True, cache=True)
def _rope_rows(x, pos, inv_freq, interleaved):
    n, d = x.shape
    half = d // 2
    out = np.empty_like(x)
    for r in nb.prange(n):
        for i in range(half):
            ang = np.float32(pos[r] * inv_freq[i])
            c = np.float32(math.cos(np.float64(ang)))
            s = np.float32(math.sin(np.float64(ang)))
            if interleaved:
                a, b = x[r, 2 * i], x[r, 2 * i + 1]
                out[r, 2 * i] = a * c + (-b) * s
                out[r, 2 * i + 1] = b * c + a * s
            else:
                a, b = x[r, i], x[r, i + half]
                out[r, i] = a * c + (-b) * s
                out[r, i + half] = b * c + a * s
    return out


def apply_rope(x, positions, theta=10000.0, convention="half"):
    """Same contract as :func:`retrokv.reference.rope.apply_rope`; one fused Numba pass (CUDA for CuPy input)."""
    if any_cupy(x, positions):
        return cuda("rope").apply_rope(x, positions, theta, convention)
    require_numpy("apply_rope", x, positions)
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    pos = np.broadcast_to(np.asarray(positions), x.shape[:-1]).astype(np.float32).reshape(-1)
    rows = np.ascontiguousarray(x.reshape(pos.shape[0], d))     # explicit row count: reshape(-1, 0) is ambiguous
    out = _rope_rows(rows, np.ascontiguousarray(pos), rope_inv_freq(d, theta), convention == "interleaved")
    return out.reshape(x.shape)


def rotate_by(x_rot, delta, theta=10000.0, convention="half"):
    """Same contract as :func:`retrokv.reference.rope.rotate_by`."""
    return apply_rope(x_rot, delta, theta, convention)
