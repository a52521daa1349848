"""Input validation at the public boundary: every error names the argument, what it got and what it expected."""
from __future__ import annotations

from numbers import Integral, Real

import numpy as np


def as_array(x, name):
    """Accept NumPy, CuPy or torch arrays (torch crosses without a copy); reject anything else.

    torch ``bfloat16`` and ``float16`` tensors are upcast to float32 first (a copy): NumPy has no
    bfloat16 (``.numpy()`` refuses it) and every kernel computes in float32 anyway.
    """
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        x = x.detach()
        if x.is_floating_point() and x.element_size() < 4:     # bfloat16 / float16 (and float8 kinds)
            x = x.float()
        if x.device.type == "cpu":
            x = x.numpy()
        else:
            import cupy  # DLPack: zero-copy from a CUDA tensor

            x = cupy.from_dlpack(x)
    elif mod != "cupy" and not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy, CuPy or torch array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype (float16/32/64), got {x.dtype}")
    return x


def check_finite(x, name):
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    if x.size and not bool(xp.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_rank(x, name, ranks, meaning):
    if x.ndim not in ranks:
        raise ValueError(f"{name} must have shape {meaning}, got shape {tuple(x.shape)}")


def check_qkv(q, k, v, finite=True):
    """Validate ``q (Hq, d) | (Hq, T, d)``, ``k (Hkv, N, d)``, ``v (Hkv, N, dv)``; returns the arrays."""
    q, k, v = as_array(q, "q"), as_array(k, "k"), as_array(v, "v")
    check_rank(q, "q", (2, 3), "(Hq, d) or (Hq, T, d)")
    check_rank(k, "k", (3,), "(Hkv, N, d)")
    check_rank(v, "v", (3,), "(Hkv, N, dv)")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k and v must agree on (Hkv, N): k has {tuple(k.shape[:2])}, v has {tuple(v.shape[:2])}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q's head_dim {q.shape[-1]} must equal k's head_dim {k.shape[-1]}")
    if k.shape[0] == 0 or q.shape[0] % k.shape[0]:
        raise ValueError(f"q's {q.shape[0]} heads must be a positive multiple of k's {k.shape[0]} KV heads (GQA)")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be positive, got 0")
    if finite:
        for x, name in ((q, "q"), (k, "k"), (v, "v")):
            check_finite(x, name)
    return q, k, v


def _is_bool(x):
    return isinstance(x, (bool, np.bool_))


def check_real(x, name, expected="a number"):
    """A real number as a Python float: Python or NumPy ints and floats pass; bools, strings, arrays and
    complex numbers raise ``TypeError`` (``True`` is an int to Python, never a number we mean)."""
    if _is_bool(x) or not isinstance(x, Real):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__} {x!r}")
    return float(x)


def check_int(x, name, lo=None, expected=None):
    """A Python or NumPy integer as a Python int, ``>= lo`` when given. Bools and floats (even ``2.0``)
    raise ``TypeError``; an int below ``lo`` raises ``ValueError``."""
    expected = expected or ("an int" if lo is None else f"an int >= {lo}")
    if _is_bool(x) or not isinstance(x, Integral):
        raise TypeError(f"{name} must be {expected}, got {type(x).__name__} {x!r}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be {expected}, got {x!r}")
    return int(x)


def check_index(x, name, n, what="an index"):
    """An integer in ``[0, n)`` (Python or NumPy int; bools and floats raise ``TypeError``)."""
    expected = f"an int in [0, {n})"
    x = check_int(x, name, expected=f"{expected} ({what})")
    if not 0 <= x < n:
        raise ValueError(f"{name} must be {expected} ({what}), got {x}")
    return x


def check_bool(x, name):
    """A real bool (Python or NumPy): a string such as ``"no"`` or a number is not silently truthy."""
    if not _is_bool(x):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return bool(x)


def check_scale(scale):
    if scale is None:
        return None
    scale = check_real(scale, "scale", "a positive finite number or None")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    return scale


def check_convention(convention):
    if not isinstance(convention, str) or convention not in ("half", "interleaved"):
        raise ValueError(f"convention must be 'half' (HF Llama rotate_half) or 'interleaved', got {convention!r}")
    return convention


def check_kv(keys, values, names=("keys", "values"), finite=True):
    """Validate one layer's ``keys (Hkv, N, d)`` and ``values (Hkv, N, dv)`` for an index.

    Returns float32, C-contiguous **copies**: an index owns its KV, so a caller who later overwrites
    the arrays it passed in cannot change what the index attends to.
    """
    kn, vn = names
    k, v = as_array(keys, kn), as_array(values, vn)
    check_rank(k, kn, (3,), "(Hkv, N, d)")
    check_rank(v, vn, (3,), "(Hkv, N, dv)")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{kn} and {vn} must agree on (Hkv, N): {kn} has {tuple(k.shape[:2])}, "
                         f"{vn} has {tuple(v.shape[:2])}")
    if k.shape[0] == 0 or k.shape[2] == 0 or v.shape[2] == 0:
        raise ValueError(f"{kn} and {vn} need Hkv > 0 and head dims > 0, got shapes {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if finite:
        check_finite(k, kn)
        check_finite(v, vn)
    xp = np if isinstance(k, np.ndarray) else __import__("cupy")
    return xp.array(k, dtype=xp.float32, order="C", copy=True), xp.array(v, dtype=xp.float32, order="C", copy=True)


def check_append(k, v, hkv, d, dv, finite=True):
    """Validate the tokens of one ``append``: ``(Hkv, d)`` for one token or ``(Hkv, n, d)`` for ``n``.

    Every decode index accepts exactly these two shapes. Returns ``(Hkv, n, d)`` and ``(Hkv, n, dv)``
    float32 copies.
    """
    k, v = as_array(k, "k"), as_array(v, "v")
    given = (tuple(k.shape), tuple(v.shape))
    if k.ndim == 2 and v.ndim == 2:
        k, v = k[:, None], v[:, None]
    if k.ndim != 3 or v.ndim != 3 or k.shape[0] != hkv or k.shape[2] != d or v.shape[0] != hkv \
            or v.shape[2] != dv or k.shape[1] != v.shape[1]:
        raise ValueError(f"append expects k of shape (Hkv={hkv}, {d}) or (Hkv={hkv}, n, {d}) and v of shape "
                         f"(Hkv={hkv}, {dv}) or (Hkv={hkv}, n, {dv}), got {given[0]} and {given[1]}")
    if finite:
        check_finite(k, "k")
        check_finite(v, "v")
    xp = np if isinstance(k, np.ndarray) else __import__("cupy")
    return xp.array(k, dtype=xp.float32, order="C", copy=True), xp.array(v, dtype=xp.float32, order="C", copy=True)

