"""retrokv.fast: the fast path. NumPy arrays run Numba kernels (CPU); CuPy arrays run CUDA kernels.

Exports the same names with the same signatures as :mod:`retrokv.reference`.
"""
import os

# libgomp threads spin while waiting by default; on a small, shared CPU that spinning steals the
# cores the next parallel region needs (measured: ~16 ms per region under oversubscription).
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from .attention import full_attention, merge_partials, partial_attention
from .rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_by, rotate_half

__all__ = ["full_attention", "partial_attention", "merge_partials",
           "apply_rope", "rotate_by", "rope_cos_sin", "rope_inv_freq", "rotate_half"]
