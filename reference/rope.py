"""Rotary position embedding (RoPE), as HF Llama applies it, and rotation by a position delta.

RoPE (Su et al., RoFormer, Eq. 34) rotates each pair of coordinates of a query or key by an angle
proportional to its position ``p``: pair ``i`` turns by ``p * theta^(-2i/d)``. Two conventions pair the
coordinates differently:

* ``"half"`` (NeoX / HF Llama ``rotate_half``): pair ``i`` is ``(x[i], x[i + d/2])``;
* ``"interleaved"`` (GPT-J / original Meta Llama): pair ``i`` is ``(x[2i], x[2i + 1])``.

Because rotations compose, ``R(a) R(b) = R(a + b)``, and they are orthogonal, ``<R(a) q, R(b) k> =
<R(a - b) q, k>``: attention scores depend only on the relative position. LazyAttention (§3) relies on
this to reuse a document's keys, rotated once at document-local positions, at any offset:
:func:`rotate_by` moves already-rotated vectors by a delta.

The angles are formed in float32 exactly as transformers does (``inv_freq`` from an integer arange,
``freqs = inv_freq * position``); cos and sin are evaluated in float64 and rounded once, so every
backend gets the same bits.
"""
from __future__ import annotations

import numpy as np

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope", "rotate_by", "rotate_half"]


def rope_inv_freq(d, theta=10000.0):
    """``inv_freq[i] = 1 / theta^(2i/d)`` for ``i < d/2``, in float32 as HF Llama computes it.

    The exponent is formed in float32 like transformers; the power is taken in float64 and rounded
    once, which reproduces torch's float32 ``pow`` (NumPy's float32 ``pow`` is off by an ulp for a few
    exponents, and at position 8000 one ulp of ``inv_freq`` moves the angle by ~1e-4).
    """
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)   # (d/2,)
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rope_cos_sin(positions, d, theta=10000.0, convention="half"):
    """Per-position ``cos`` and ``sin`` tables, shaped ``positions.shape + (d,)``.

    For ``"half"`` the d/2 angles are repeated (``cat(freqs, freqs)``, as HF Llama); for
    ``"interleaved"`` each angle appears twice in a row.
    """
    pos = np.asarray(positions).astype(np.float32)
    freqs = pos[..., None] * rope_inv_freq(d, theta)                          # (..., d/2) float32
    emb = np.concatenate([freqs, freqs], -1) if convention == "half" else np.repeat(freqs, 2, -1)
    emb64 = emb.astype(np.float64)
    return np.cos(emb64).astype(np.float32), np.sin(emb64).astype(np.float32)


def rotate_half(x):
    """``(x1, x2) -> (-x2, x1)`` on the two halves of the last axis (HF Llama's ``rotate_half``)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_pairs(x):
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)``: the interleaved counterpart of rotate_half."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def apply_rope(x, positions, theta=10000.0, convention="half"):
    """Rotate ``x`` (``(..., d)``) to ``positions`` (broadcastable to ``x.shape[:-1]``).

    ``x * cos + rotate_half(x) * sin`` in float32, in this order, so the result is bit-identical to
    transformers' ``apply_rotary_pos_emb`` given the same cos/sin tables.
    """
    x = np.asarray(x, dtype=np.float32)
    pos = np.broadcast_to(np.asarray(positions), x.shape[:-1])
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta, convention)            # (..., d)
    rot = rotate_half(x) if convention == "half" else _rotate_pairs(x)
    with np.errstate(invalid="ignore"):          # inf * 0 in an unchecked input is NaN, quietly, as in the fast path
        return (x * cos + rot * sin).astype(np.float32)


def rotate_by(x_rot, delta, theta=10000.0, convention="half"):
    """Move vectors already rotated to position ``p`` to position ``p + delta``: ``R(delta) R(p) = R(p + delta)``.

    ``delta`` may be negative (de-rotation: LazyAttention rotates the query by ``-offset`` once per
    document instead of rotating every cached key by ``+offset``).
    """
    return apply_rope(x_rot, delta, theta, convention)
