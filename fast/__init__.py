"""retrokv.fast: the fast path. NumPy arrays run Numba kernels (CPU); CuPy arrays run CUDA kernels.

Exports the same names with the same signatures as :mod:`retrokv.reference`.
"""
# libgomp's wait policy (passive: no spinning threads between parallel regions) is set once, by
# ``import retrokv`` (retrokv/__init__.py), which importing this package runs first.
from .attention import full_attention, merge_partials, partial_attention
from .rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_by, rotate_half

__all__ = ["full_attention", "partial_attention", "merge_partials",
           "apply_rope", "rotate_by", "rope_cos_sin", "rope_inv_freq", "rotate_half"]
