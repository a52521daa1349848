"""retrokv: the KV cache of a long-context LLM as a vector database.

Three published systems, each as a readable NumPy reference (:mod:`retrokv.reference`) and a fast
path (:mod:`retrokv.fast`), behind one ``backend=`` switch:

* RetrievalAttention (arXiv 2409.10516): :class:`GraphIndex`, an attention-aware graph over keys;
* RetroInfer (arXiv 2505.02922): :class:`WaveIndex` and :class:`WaveBuffer`;
* LazyAttention (arXiv 2606.04302): :class:`DocumentStore`, position-agnostic document KV.

Every decode-time method is a :class:`DecodeIndex` chosen by name in :mod:`retrokv.methods`;
:mod:`retrokv.hf` attaches one to a transformers model; :mod:`retrokv.harness` evaluates them.
"""
from __future__ import annotations

import importlib
import os
import sys

# OpenMP threads (torch's, and Numba's parallel kernels') spin after each parallel region by default;
# on a small CPU the spinning takes the cores from the next region or BLAS call. libgomp reads the
# policy once, when it loads, so it is set here, before torch is imported through retrokv.hf; a value
# the user set is kept. A parallel region under oversubscription cost ~16 ms with spinning instead of
# ~5 us (docs/wave_index.md, the speed table's caveat). Measured on 2 cores (benchmarks/decode_speed.py
# with and without it, docs/generation.md): the wave index builds 2.3-3x faster; decode within noise.
_TORCH_LOADED_FIRST = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from .api import apply_rope, full_attention, merge_partials, partial_attention, rotate_by
from .backend import get_backend, set_backend

__version__ = "0.1.0"

# Heavier components load on first use, so `import retrokv` needs only NumPy.
_LAZY = {
    "WaveConfig": "retrokv.wave_index", "WaveIndex": "retrokv.wave_index", "WaveStats": "retrokv.wave_index",
    "WaveBuffer": "retrokv.wave_buffer", "WaveBufferStats": "retrokv.wave_buffer",
    "GraphConfig": "retrokv.graph_index", "GraphIndex": "retrokv.graph_index",
    "StreamingLLM": "retrokv.baselines", "TopKOracle": "retrokv.baselines",
    "IVFIndex": "retrokv.baselines", "QuestIndex": "retrokv.baselines",
    "StreamingConfig": "retrokv.baselines", "TopKConfig": "retrokv.baselines",
    "IVFConfig": "retrokv.baselines", "QuestConfig": "retrokv.baselines",
    "DocumentStore": "retrokv.lazy", "LazyConfig": "retrokv.lazy", "LazyRequest": "retrokv.lazy",
    "StaleRequestError": "retrokv.lazy",
    "DenseIndex": "retrokv.dense", "DenseConfig": "retrokv.dense",
    "DecodeIndex": "retrokv.index", "IndexStats": "retrokv.index",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrokv' has no attribute {name!r}")


__all__ = ["full_attention", "partial_attention", "merge_partials", "apply_rope", "rotate_by",
           "set_backend", "get_backend", *_LAZY]
