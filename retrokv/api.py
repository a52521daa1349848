"""Public attention and RoPE functions: validate at the boundary, then call the chosen backend.

Each function takes ``backend="reference" | "fast"`` (default: :func:`retrokv.get_backend`).
"""
from __future__ import annotations

import numpy as np

from . import _validate as V
from .backend import module


def full_attention(q, k, v, causal=False, scale=None, backend=None, check_finite=True):
    """Exact softmax attention with grouped-query heads.

    Args:
        q: ``(Hq, d)`` (one decode step) or ``(Hq, T, d)`` (a block of T queries).
        k: ``(Hkv, N, d)`` keys; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        v: ``(Hkv, N, dv)`` values.
        causal: for a block, query ``t`` sees keys ``0 .. N - T + t`` (the queries are the last T
            positions). Ignored for a single decode query, which sees every key.
        scale: score scale, default ``1 / sqrt(d)``.
        backend: ``"reference"`` or ``"fast"``.
        check_finite: reject NaN/inf in the inputs (one extra pass over K and V). With ``False`` a NaN
            propagates: every output row that reads it is NaN, on both backends.

    Returns:
        ``(Hq, dv)`` or ``(Hq, T, dv)`` float32 output. With ``N = 0`` the output is zero.
    """
    return partial_attention(q, k, v, causal, scale, backend, check_finite)[0]


def partial_attention(q, k, v, causal=False, scale=None, backend=None, check_finite=True):
    """Attention over a subset of the keys, with its log-sum-exp: returns ``(out, lse)``.

    ``lse = log sum_j exp(q.k_j * scale)`` has ``q``'s shape without the last axis; an empty key set
    gives ``(0, -inf)``. Partials over disjoint key sets combine exactly with :func:`merge_partials`
    (RetrievalAttention App. B). Arguments as :func:`full_attention`.
    """
    q, k, v = V.check_qkv(q, k, v, finite=V.check_bool(check_finite, "check_finite"))
    scale = V.check_scale(scale)
    causal = V.check_bool(causal, "causal")          # a string such as "no" must not act as True
    if causal and q.ndim == 3 and q.shape[1] > k.shape[1]:
        raise ValueError(f"causal attention needs at least T={q.shape[1]} keys for T queries, got N={k.shape[1]}")
    return module(backend).partial_attention(q, k, v, causal=causal, scale=scale)


def merge_partials(parts, backend=None):
    """Merge ``[(out_1, lse_1), (out_2, lse_2), ...]`` over disjoint key sets by log-sum-exp.

    Returns ``(out, lse)`` equal to the attention over the union. The merge is associative and
    order-independent; a part with ``lse = -inf`` changes nothing.
    """
    if isinstance(parts, (str, bytes)) or not hasattr(parts, "__iter__"):
        raise TypeError(f"parts must be a sequence of (out, lse) pairs, got {type(parts).__name__}")
    parts = list(parts)
    if not parts:
        raise ValueError("parts must hold at least one (out, lse) pair, got an empty sequence")
    checked = []
    for i, part in enumerate(parts):
        if not isinstance(part, (tuple, list)) or len(part) != 2:
            raise TypeError(f"parts[{i}] must be an (out, lse) pair, got {type(part).__name__}")
        o, l = V.as_array(part[0], f"parts[{i}].out"), V.as_array(part[1], f"parts[{i}].lse")
        if o.ndim == 0:
            raise ValueError(f"parts[{i}].out must have at least one axis (..., dv), got a 0-d array")
        if o.shape[:-1] != l.shape:
            raise ValueError(f"parts[{i}]: lse shape {tuple(l.shape)} must be out's shape {tuple(o.shape)} without its last axis")
        if checked and o.shape != checked[0][0].shape:
            raise ValueError(f"parts[{i}].out has shape {tuple(o.shape)}, parts[0].out has {tuple(checked[0][0].shape)}")
        if bool(np.isnan(np.asarray(l)).any()) or bool(np.isposinf(np.asarray(l)).any()):
            raise ValueError(f"parts[{i}].lse must be finite or -inf, got NaN or +inf")
        V.check_finite(o, f"parts[{i}].out")          # a NaN out would pass through the merge unnoticed
        checked.append((o, l))
    return module(backend).merge_partials(checked)


def _check_rope(x, positions, theta, convention, xn="x", pn="positions"):
    """Validate RoPE arguments; ``xn``/``pn`` are the caller's names (``x_rot``/``delta`` for rotate_by)."""
    x = V.as_array(x, xn)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"{xn} must have an even last axis (head_dim), got shape {tuple(x.shape)}")
    pos = np.asarray(positions)
    if pos.dtype.kind not in "iu":
        raise TypeError(f"{pn} must be integers, got dtype {pos.dtype}")
    lead = tuple(x.shape[:-1])
    try:
        ok = np.broadcast_shapes(pos.shape, lead) == lead    # positions broadcast to x, never x to positions
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{pn} of shape {pos.shape} do not broadcast to {xn}'s leading shape {lead}")
    theta = V.check_real(theta, "theta", "a number > 1")       # NumPy scalars (np.float32(1e5)) included
    if not theta > 1 or not np.isfinite(theta):
        raise ValueError(f"theta must be a finite number > 1, got {theta!r}")
    return x, pos, theta, V.check_convention(convention)


def apply_rope(x, positions, theta=10000.0, convention="half", backend=None):
    """Rotate ``x`` (``(..., d)``) to integer ``positions`` (broadcastable to ``x.shape[:-1]``).

    ``convention="half"`` is HF Llama's ``rotate_half`` pairing; ``"interleaved"`` pairs ``(2i, 2i+1)``.
    Bit-identical to transformers' ``apply_rotary_pos_emb`` given the same cos/sin (RoFormer Eq. 34).
    """
    x, pos, theta, convention = _check_rope(x, positions, theta, convention)
    return module(backend).apply_rope(x, pos, theta, convention)


def rotate_by(x_rot, delta, theta=10000.0, convention="half", backend=None):
    """Move already-rotated vectors by a position ``delta`` (may be negative): ``R(delta) R(p) = R(p + delta)``."""
    x, pos, theta, convention = _check_rope(x_rot, delta, theta, convention, "x_rot", "delta")
    return module(backend).rotate_by(x, pos, theta, convention)
