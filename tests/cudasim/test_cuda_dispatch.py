"""Dispatch in ``retrokv.fast``: CuPy input reaches the CUDA kernels; what the papers run on the CPU refuses it, saying why."""
from __future__ import annotations

import numpy as np
import pytest

import retrokv as rk
from cuda_helpers import GPU
from retrokv.fast import _dispatch
from retrokv.fast import graph_index as cpu_graph
from retrokv.fast.cuda import graph_index as cu_graph


class FakeCuPy:
    """Looks like a CuPy array to the dispatcher (its type lives in a module named ``cupy``) without CuPy."""


FakeCuPy.__module__ = "cupy._core.core"


def test_graph_build_and_search_refuse_the_gpu_naming_the_paper():
    with pytest.raises(TypeError, match="RetrievalAttention .* on the CPU"):
        cu_graph.graph_search()
    with pytest.raises(TypeError, match="runs on the CPU by design: RetrievalAttention"):
        cpu_graph.graph_search(FakeCuPy(), np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64), 0, 1, 4)
    with pytest.raises(TypeError, match="runs on the CPU by design: RetroInfer"):
        _dispatch.require_numpy("plan_step", FakeCuPy())
    with pytest.raises(TypeError, match="no CUDA kernel in this build"):
        _dispatch.require_numpy("exact_topk", FakeCuPy())


@pytest.mark.skipif(not GPU, reason="routing CuPy arrays needs CuPy and a GPU")
def test_public_api_routes_cupy_to_cuda(arrays, rng):
    q = rng.standard_normal((4, 2, 8)).astype(np.float32)
    k = rng.standard_normal((2, 9, 8)).astype(np.float32)
    out = rk.full_attention(arrays.dev(q), arrays.dev(k), arrays.dev(k), causal=True, backend="fast")
    assert type(out).__module__.startswith("cupy")                    # stays on the device
    np.testing.assert_allclose(arrays.host(out), rk.full_attention(q, k, k, causal=True), atol=2e-6)
    x = rk.apply_rope(arrays.dev(k[0]), np.arange(9), backend="fast")
    assert type(x).__module__.startswith("cupy")
    np.testing.assert_allclose(arrays.host(x), rk.apply_rope(k[0], np.arange(9)), atol=1e-6)
