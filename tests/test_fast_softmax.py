"""The fast kernels' vectorised ``exp(x - m)`` (fast/_softmax.py) against float64 ``exp``: under one float32
ulp where the result is a normal number, exactly 0 below ``-87`` and for ``-inf``, NaN for NaN, the same
bits in place as out of place."""
from __future__ import annotations

import numpy as np
from hypothesis import given, strategies as st

from retrokv.fast._softmax import exp_shifted, has_nan, max_of, max_or_nan


def _exp(x, m):
    out = np.empty_like(x)
    exp_shifted(x, np.float32(m), out, np.empty(2 * len(x), np.float32))
    return out


def _ulps(got, x, m):
    """Error of ``got`` in float32 ulps of the true exp of the float32 ``t = x - m`` (the kernel's input;
    that subtraction's own rounding is every float32 softmax's, NumPy's included)."""
    want = np.exp((x - np.float32(m)).astype(np.float64))
    return np.abs(got.astype(np.float64) - want) / np.spacing(want.astype(np.float32)).astype(np.float64)


def test_under_one_ulp_on_the_whole_range():
    x = np.linspace(-87.0, 0.0, 400_001, dtype=np.float32)
    x = x[(x - np.float32(0.0)) >= -87.0]
    assert _ulps(_exp(x, 0.0), x, 0.0).max() < 1.0
    t = np.linspace(0.0, 88.0, 10_001, dtype=np.float32)            # above the callers' range, still exact
    assert _ulps(_exp(t, 0.0), t, 0.0).max() < 1.0


@given(st.lists(st.floats(-200, 200, width=32), min_size=1, max_size=300), st.booleans())
def test_softmax_rows(values, in_place):
    """A row shifted by its own max (how every caller uses it): close to exp, 1 at the max, 0 far below."""
    x = np.array(values, np.float32)
    m = x.max()
    if in_place:
        got = x.copy()
        exp_shifted(got, m, got, np.empty(2 * len(x), np.float32))
        assert np.array_equal(got, _exp(x, m))                   # same bits as out of place
    else:
        got = _exp(x, m)
    low = (x - m) < np.float32(-87.0)
    assert np.all(got[low] == 0.0)
    assert _ulps(got[~low], x[~low], m).max() < 1.0
    assert np.all(got[x == m] == 1.0)
    assert np.all((got >= 0.0) & (got <= 1.0))


def test_special_values():
    x = np.array([-np.inf, np.nan, 0.0, -1e30, -87.5, -86.9, 1e-30], np.float32)
    got = _exp(x, 0.0)
    assert got[0] == 0.0 and np.isnan(got[1]) and got[2] == 1.0 and got[3] == 0.0 and got[4] == 0.0
    assert got[5] > 0.0 and got[6] == 1.0
    assert np.isnan(_exp(np.zeros(3, np.float32), np.nan)).all()   # a NaN shift poisons the row


@given(st.lists(st.floats(allow_nan=False, width=32), max_size=200))
def test_max_of_equals_numpy_max(values):
    x = np.array(values, np.float32)
    assert max_of(x) == (x.max() if len(x) else -np.inf)
    assert not has_nan(x)


@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=200), st.data())
def test_has_nan_finds_any_nan(values, data):
    x = np.array(values, np.float32)
    x[data.draw(st.integers(0, len(x) - 1))] = np.nan
    assert has_nan(x)


@given(st.lists(st.floats(-1e3, 1e3, width=32), max_size=100), st.booleans())
def test_max_or_nan(values, with_nan):
    x = np.array(values + ([np.nan] if with_nan else []), np.float32)
    got = max_or_nan(x)
    if with_nan:
        assert np.isnan(got)
    else:
        assert got == (x.max() if len(x) else -np.inf)
