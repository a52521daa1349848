"""RetrievalAttention's CPU–GPU co-execution (fast/cuda/graph_index.py) and the CPU-only refusals."""
from __future__ import annotations

import numpy as np
import pytest

import retrokv.fast as fast
from retrokv.fast import _dispatch
from retrokv.fast import graph_index as cpu_graph
from retrokv.fast.cuda import graph_index as cu
from retrokv.reference import attention as ref


class FakeCuPy:
    """Looks like a CuPy array to the dispatcher (its type lives in a module named ``cupy``) without CuPy."""


FakeCuPy.__module__ = "cupy._core.core"


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


def test_graph_build_and_search_refuse_the_gpu_naming_the_paper():
    with pytest.raises(TypeError, match="RetrievalAttention .* on the CPU"):
        cu.graph_search()
    with pytest.raises(TypeError, match="runs on the CPU by design: RetrievalAttention"):
        cpu_graph.graph_search(FakeCuPy(), np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64), 0, 1, 4)
    with pytest.raises(TypeError, match="runs on the CPU by design: RetroInfer"):
        _dispatch.require_numpy("plan_step", FakeCuPy())
    with pytest.raises(TypeError, match="no CUDA kernel in this build"):
        _dispatch.require_numpy("exact_topk", FakeCuPy())
