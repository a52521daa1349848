"""RetrievalAttention's CPU–GPU co-execution (fast/cuda/graph_index.py)."""
from __future__ import annotations

import numpy as np

import retrokv.fast as fast
from retrokv.fast.cuda import graph_index as cu
from retrokv.reference import attention as ref


def test_static_on_gpu_plus_retrieved_on_cpu_is_attention_over_the_union(arrays, rng):
    k = rng.standard_normal((2, 40, 8)).astype(np.float32)
    v = rng.standard_normal((2, 40, 6)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    static = np.r_[0:4, 30:40]                       # sinks + window, on the device
    retrieved = np.r_[10:20]                         # what a graph search would return, on the host

    def cpu_partial(q_host):
        assert isinstance(q_host, np.ndarray)
        return fast.partial_attention(q_host, k[:, retrieved], v[:, retrieved])

    out, lse = cu.co_attention(arrays.dev(q), arrays.dev(k[:, static]), arrays.dev(v[:, static]), cpu_partial)
    keep = np.r_[static, retrieved]
    want, want_lse = ref.partial_attention(q, k[:, keep], v[:, keep])
    np.testing.assert_allclose(arrays.host(out), want, atol=2e-6)
    np.testing.assert_allclose(arrays.host(lse), want_lse, atol=2e-6)
