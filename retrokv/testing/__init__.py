"""retrokv.testing: a differential-testing kit for attention kernels, retrokv's own and other people's.

::

    from retrokv.testing import assert_attention_close, oracles, invariants, strategies

    assert_attention_close(my_out, q, k, v, causal=True)          # judged in my_out's precision
    out, lse = oracles.wave_reference(q, k, v, rk.WaveConfig())   # RetroInfer's output, for a wave kernel

* :mod:`~retrokv.testing.tolerances`: :func:`assert_attention_close`, FlashAttention-style bounds;
* :mod:`~retrokv.testing.oracles`: float64 attention and each retrokv method's reference output;
* :mod:`~retrokv.testing.invariants`: reusable checks (LSE merge, zones, Jensen bound, full budget, RoPE);
* :mod:`~retrokv.testing.strategies`: hypothesis strategies for attention problems (needs hypothesis);
* :mod:`~retrokv.testing.real_data`: a cached sample of SmolLM2 Q/K/V (needs torch the first time).

Importing this package needs only NumPy: ``strategies`` loads hypothesis on first access, and the
real-data sample imports torch only to generate it.
"""
from __future__ import annotations

import importlib

from . import invariants, oracles, real_data
from .oracles import attention_oracle
from .real_data import load_real_qkv
from .tolerances import CloseReport, Comparison, assert_attention_close, attention_close

__all__ = ["assert_attention_close", "attention_close", "attention_oracle", "load_real_qkv", "CloseReport",
           "Comparison", "oracles", "invariants", "real_data", "strategies"]


def __getattr__(name):
    # hypothesis is a test-time dependency: load the strategies module only when it is asked for
    if name == "strategies":
        module = importlib.import_module("retrokv.testing.strategies")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'retrokv.testing' has no attribute {name!r}")
