"""The cudasim ring: every CUDA kernel of ``retrokv.fast.cuda`` against the NumPy reference.

It runs in one of two ways, and is skipped otherwise (``make test``'s main pytest run collects these
files and reports them skipped):

* ``NUMBA_ENABLE_CUDASIM=1`` (a separate process: the variable must be set before Numba is
  imported): the kernels run in Numba's CUDA simulator on NumPy arrays, on any CPU. This is what CI runs;
* a machine with CuPy and a GPU: the same tests on CuPy arrays, marked ``gpu``.

Sizes are tiny: the simulator runs each CUDA thread as a Python thread.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from cuda_helpers import GPU, SIMULATOR, Arrays

REASON = "CUDA kernels need NUMBA_ENABLE_CUDASIM=1 (simulator) or CuPy with a GPU"

if SIMULATOR:
    import threading

    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    # The simulator's syncthreads is a barrier between Python threads; with the default 5 ms GIL switch
    # interval every barrier waits for switches (measured: 10x slower per barrier than at 1 us).
    sys.setswitchinterval(1e-6)

    # The simulator hands out a block's shared array with an unlocked check-then-set (numba 0.68,
    # simulator/kernelapi.py FakeCUDAShared.array): with frequent thread switches two threads of one
    # block can each get a private array, a race the simulator has and a GPU does not (one early run of
    # this ring failed once without an explanation, before this lock; not reproduced since). The same
    # lookup, keyed by the calling line as the simulator keys it, under a lock:
    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype):
        if shape == 0:
            return _simulator_shared_array(self, shape, dtype)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _shared_lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    _simulator_shared_array = kernelapi.FakeCUDAShared.array
    kernelapi.FakeCUDAShared.array = _shared_array


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if not (SIMULATOR or GPU):
            item.add_marker(pytest.mark.skip(reason=REASON))
        elif GPU:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session", params=["cupy" if GPU else "numpy"])
def arrays(request):
    return Arrays(request.param)
