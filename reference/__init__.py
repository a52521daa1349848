"""retrokv.reference: the NumPy reference implementation, one file per paper concept.

Every name here exists in :mod:`retrokv.fast` with the same signature and results (docs/index.md,
"Conventions" and "Architecture").
"""
from .attention import full_attention, merge_partials, partial_attention
from .rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_by, rotate_half

__all__ = ["full_attention", "partial_attention", "merge_partials",
           "apply_rope", "rotate_by", "rope_cos_sin", "rope_inv_freq", "rotate_half"]
