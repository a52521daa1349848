"""How a block's threads walk a row-major tile: the index arithmetic every CUDA copy loop shares.

A flattened loop ``for e in range(tid, n * width, nt): dst[e // width, e % width] = ...`` pays two integer
divisions per element, and Numba types these indices int64: a 64-bit division is a long instruction
sequence on a GPU (no hardware divider), in the loops that stage every key and value of a decode step.
:func:`lanes` does the two divisions once per thread instead; the loops then only add::

    row, row_step, col, col_step = lanes(width, tid, nt)
    for t in range(row, n, row_step):           # the rows this thread touches
        for x in range(col, width, col_step):   # its columns of each row
            dst[t, x] = src[t, x]

Consecutive threads take consecutive columns of one row (consecutive addresses: coalesced), and when a
row is shorter than the block, ``nt // width`` rows are covered at once. The ``nt % width`` threads left
over idle (their first row is past any end). Under the simulator the same code runs with 4 threads, so
``width < nt`` and ``width > nt`` are both exercised by the cudasim ring.
"""
from __future__ import annotations

from numba import cuda

__all__ = ["lanes", "IDLE"]

IDLE = 1 << 62          # a first row past any end: the thread copies nothing


@cuda.jit(device=True)
def lanes(width, tid, nt):
    """``(row, row_step, col, col_step)`` of thread ``tid`` of ``nt`` over rows of ``width`` elements."""
    cols = min(width, nt)
    if cols <= 0:
        return IDLE, 1, 0, 1
    step = nt // cols
    row = tid // cols
    col = tid - row * cols
    if row >= step:
        row = IDLE
    return row, step, col, cols
