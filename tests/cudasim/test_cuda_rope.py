"""The fused RoPE kernel (fast/cuda/rope.py): bit-identical to the reference under the simulator."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from retrokv.fast.cuda import rope as cu
from retrokv.reference import rope as ref


@st.composite
def rows(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=2)))
    d = draw(st.sampled_from([2, 8, 18, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal(shape + (d,)).astype(np.float32)
    pos = rng.integers(-9000, 9000, shape) if draw(st.booleans()) else int(rng.integers(-100, 8000))
    return x, pos, draw(st.sampled_from([1e4, 1e5, 5e5])), draw(st.sampled_from(["half", "interleaved"]))


def _check(arrays, got, want):
    got = arrays.host(got)
    assert got.shape == want.shape and got.dtype == np.float32
    if arrays.exact:
        assert np.array_equal(got, want)               # same float32 ops in the same order
    else:                                              # a GPU may fuse the multiply-add: an ulp or so
        np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(np.float32).eps * max(1.0, np.abs(want).max(initial=0)))


@settings(max_examples=20, deadline=None)
@given(rows())
def test_apply_rope_matches_reference(arrays, case):
    x, pos, theta, conv = case
    _check(arrays, cu.apply_rope(arrays.dev(x), pos, theta, conv), ref.apply_rope(x, pos, theta, conv))


def test_rotate_by_composes(arrays, rng):
    x = rng.standard_normal((3, 7, 16)).astype(np.float32)
    p = np.arange(7)
    rotated = cu.apply_rope(arrays.dev(x), p)
    moved = cu.rotate_by(rotated, -5)
    _check(arrays, moved, ref.rotate_by(ref.apply_rope(x, p), -5))
    np.testing.assert_allclose(arrays.host(moved), ref.apply_rope(x, p - 5), atol=1e-5)


def test_rotate_half_stays_in_namespace(arrays, rng):
    x = rng.standard_normal((2, 6)).astype(np.float32)
    np.testing.assert_array_equal(arrays.host(cu.rotate_half(arrays.dev(x))), ref.rotate_half(x))
