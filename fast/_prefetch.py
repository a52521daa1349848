"""Software prefetch for the fast kernels' gathers: :func:`prefetch_rows`.

A wave decode step reads rows the hardware prefetcher cannot guess: the value sums of the estimated
clusters (one 256-512-byte row each, scattered over all the clusters) and the retrieved clusters'
key and value blocks (a few KiB each, anywhere in the cluster-sorted copy). Each row then costs a
memory latency that the loop cannot hide, because the next address is known only when the loop
gets there. The kernels know every address ahead (the zones are chosen before any row is read), so
they ask for a row several iterations before it is needed: ``llvm.prefetch``, which compiles to
``prefetcht0`` on x86-64 and does not fault or change any value.

Numba has no prefetch; :func:`_prefetch` is an ``@intrinsic`` that emits the LLVM call. If this
Numba/LLVM cannot compile it, :data:`AVAILABLE` is False and :func:`prefetch_rows` does nothing: the
results are the same either way, only the speed differs.
"""
from __future__ import annotations

import numba as nb
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

_LINE = 64                                  # bytes of a cache line (x86-64, arm64)


@intrinsic
def _prefetch(typingctx, arr, flat):
    """Prefetch (for reading, into every cache level) the line holding element ``flat`` of the C-contiguous
    ``arr`` (counted from its first element)."""
    if not isinstance(arr, types.Array) or not isinstance(flat, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        base = builder.bitcast(ary.data, ir.IntType(8).as_pointer())
        size = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        offset = builder.mul(args[1], ir.Constant(args[1].type, size))
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read (0), keep in all levels (3), data cache (1)
        builder.call(fn, [builder.gep(base, [offset]), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, flat), codegen


@nb.njit(cache=True)
def _prefetch_rows_llvm(arr, h, a, b):
    """Every cache line of the rows ``a:b`` of ``arr[h]`` (a C-contiguous 3-D array; nothing when ``b <= a``)."""
    row = arr.shape[2]
    step = _LINE // arr.itemsize
    for e in range((h * arr.shape[1] + a) * row, (h * arr.shape[1] + b) * row, step):
        _prefetch(arr, e)


@nb.njit(cache=True)
def _prefetch_rows_none(arr, h, a, b):
    """Stand-in where the intrinsic does not compile: prefetching is only a hint."""
    return


def _probe():
    import numpy as np

    try:
        _prefetch_rows_llvm(np.zeros((1, 4, 16), np.float32), 0, 0, 4)
    except Exception:                       # an LLVM without the intrinsic's name: run without hints
        return False
    return True


AVAILABLE = _probe()
prefetch_rows = _prefetch_rows_llvm if AVAILABLE else _prefetch_rows_none
