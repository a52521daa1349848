"""The pieces of a float32 softmax row written so that LLVM vectorises them: :func:`max_of`,
:func:`has_nan`, :func:`max_or_nan`, :func:`exp_shifted` (the fast kernels' softmax weights ``exp(x - m)``).

A loop vectorises when it holds no calls and LLVM may reorder its reduction. A max reduction with
``max()`` may not be reordered while a NaN could be among the values (IEEE max is not associative then):
:func:`max_of` is compiled with ``nnan`` and leaves the NaN question to :func:`has_nan`, an integer count
that vectorises without any fast-math flag. The exp needs more:

Numba lowers ``math.exp`` on float32 to a call of the C library's ``expf``: LLVM cannot vectorise a loop
around that call without a vector math library (Intel's SVML, which the PyPI llvmlite does not link),
so every softmax weight of a decode step costs a scalar call, ~2 ns on this machine. A wave decode
step of SmolLM2 at 32K tokens takes ~30 000 of them per layer (the cluster ranking's softmax over every
centroid score, the estimation zone's weights, the exact zone's weights), a fifth of the step on one
core. :func:`exp_shifted` computes the same function with arithmetic only, so the loop vectorises:

1. **Range reduction** (Cody and Waite): with ``t = x - m``, ``k = round(t / ln 2)`` and
   ``r = t - k ln 2`` (``ln 2`` split into a short high part, exact times any small ``k``, and the low
   rest), ``exp(t) = 2^k exp(r)`` with ``|r| <= ln(2) / 2``.
2. **Polynomial**: ``exp(r)`` by its Taylor series to degree 7 (Horner). On ``|r| <= 0.347`` the
   truncation error is below ``0.347^8 / 8! < 5.2e-9``, about a tenth of a float32 half-ulp (``6e-8``).
3. **Scale**: ``2^k`` is the float32 whose exponent bits are ``k + 127`` (``k >= -126``, a normal
   number): written as integers through an int32 view of scratch memory and read back as float32.

The callers pass a row's max as ``m``, so ``t <= 0``; the function is exact to the same bound up to
``t = 88`` (above, ``2^k`` overflows the exponent bits). ``t < -87`` (where float32 ``exp`` reaches the
denormals) gives exactly 0, and so does ``t = -inf`` (an
empty cluster, a masked score); a NaN gives NaN (the callers detect NaN rows by it). Error against
``exp`` in float64: below one float32 ulp on ``[-87, 0]`` (0.59 measured on a grid of 2 million points;
tests/test_fast_softmax.py asserts 1), where NumPy's float32 ``exp`` errs by up to 2.4. The reference kernels
keep NumPy's ``exp``: fast and reference already differed by ulps through their summation orders.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)           # 355 / 512, 9 significant bits: k * _LN2_HI is exact for |k| < 2^15
_LN2_LO = np.float32(-2.12194440e-4)        # ln 2 - _LN2_HI
_LOW = np.float32(-87.0)                    # below: 0 (float32 exp is denormal or 0 there)
# 1 / j!, j = 7 .. 2 (Horner from the highest degree); the degree 1 and 0 terms are added as r + 1
_C7, _C6, _C5 = np.float32(1 / 5040), np.float32(1 / 720), np.float32(1 / 120)
_C4, _C3, _C2 = np.float32(1 / 24), np.float32(1 / 6), np.float32(0.5)


# "contract" only: with "reassoc" LLVM may fold the two halves of ln 2 back into one constant
@nb.njit(cache=True, fastmath={"contract"})
def exp_shifted(x, m, out, scratch):
    """``out[i] = exp(x[i] - m)`` for the 1-D float32 ``x``; ``out`` may be ``x`` itself. ``scratch``:
    float32, at least ``2 len(x)`` long. Steps 1-3 of the module docstring.

    Each loop reads and writes different arrays: LLVM vectorises a loop behind a runtime check that
    its arrays do not overlap, and an in-place loop fails the check and runs scalar (slower than
    ``expf``); hence the polynomial goes to ``scratch`` first, not to ``out``."""
    n = x.shape[0]
    p = scratch[:n]
    scale = scratch[n:2 * n]
    bits = scale.view(np.int32)
    for i in range(n):                                  # vectorised: no calls, no branches
        t = x[i] - m
        low = t < _LOW                                  # False for NaN: NaN flows through to out
        tc = _LOW if low else t
        kf = math.floor(tc * _LOG2E + np.float32(0.5))  # 1. k = round(t / ln 2)
        r = (tc - kf * _LN2_HI) - kf * _LN2_LO
        q = _C7 * r + _C6                               # 2. exp(r), Taylor to degree 7
        q = q * r + _C5
        q = q * r + _C4
        q = q * r + _C3
        q = q * r + _C2
        p[i] = (q * r) * r + r + np.float32(1.0)
        bits[i] = 0 if low else (np.int32(kf) + 127) << 23
    for i in range(n):                                  # 3. times 2^k (0.0 where t < -87)
        out[i] = p[i] * scale[i]


@nb.njit(cache=True, fastmath={"nnan", "nsz"})
def max_of(row):
    """The greatest of the 1-D ``row`` (``-inf`` when empty). ``nnan`` lets LLVM use vector max: with a NaN
    in ``row`` the result is unspecified (a NaN or some value), so callers that care ask :func:`has_nan`."""
    best = np.float32(-np.inf)
    for i in range(row.shape[0]):
        best = max(best, row[i])
    return best


@nb.njit(cache=True)
def has_nan(row):
    """Whether the 1-D ``row`` holds a NaN (a vectorised count; no fast-math, which would assume none)."""
    n = 0
    for i in range(row.shape[0]):
        n += row[i] != row[i]
    return n > 0


@nb.njit(cache=True)
def max_or_nan(row):
    """The greatest of the 1-D ``row``, or NaN when ``row`` holds one (``-inf`` when empty): the max a
    softmax needs, NaN in giving NaN out. Two vectorised passes, :func:`max_of` and :func:`has_nan`."""
    return np.float32(np.nan) if has_nan(row) else max_of(row)
