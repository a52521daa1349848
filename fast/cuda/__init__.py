"""retrokv.fast.cuda: the GPU half of ``backend="fast"`` (numba.cuda kernels on CuPy arrays).

``retrokv.fast`` routes CuPy input here; NumPy input stays on the Numba CPU kernels. Every module
also runs under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on NumPy arrays, which is how
the kernels are tested without a GPU (``tests/cudasim``). Submodules mirror ``reference/``:
``attention``, ``rope``, ``clustering``, ``wave_index``, ``wave_buffer``, ``lazy``, ``graph_index``.
Nothing is imported eagerly: importing a submodule compiles nothing until a kernel first runs.
"""
