"""Software prefetch (fast/_prefetch.py): it compiles with the pinned Numba/LLVM (else the kernels would
silently lose it) and, being a hint, leaves every value as it was."""
from __future__ import annotations

import numba as nb
import numpy as np

from retrokv.fast import _prefetch


def test_the_intrinsic_compiles_here():
    assert _prefetch.AVAILABLE, "llvm.prefetch did not compile: the fast kernels run without prefetch"
    assert _prefetch.prefetch_rows is _prefetch._prefetch_rows_llvm


@nb.njit
def _sum_with_prefetch(x, ahead):
    total = np.float32(0.0)
    for h in range(x.shape[0]):
        for t in range(x.shape[1]):
            _prefetch.prefetch_rows(x, h, t + ahead, min(t + ahead + 1, x.shape[1]))   # none past the end
            for i in range(x.shape[2]):
                total += x[h, t, i]
    _prefetch.prefetch_rows(x, x.shape[0] - 1, x.shape[1] - 1, x.shape[1])   # the very last row
    return total


def test_prefetch_changes_no_value():
    x = np.random.default_rng(0).standard_normal((3, 50, 17)).astype(np.float32)
    before = x.copy()
    assert _sum_with_prefetch(x, 4) == _sum_with_prefetch(x, 10 ** 6)   # same loop, prefetch never reached
    assert np.array_equal(x, before)
