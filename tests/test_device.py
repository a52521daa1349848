"""The ``device=`` choice of the public classes: validation and what each class accepts (no GPU needed).

The CUDA path itself is tested in the cudasim ring (``tests/cudasim/test_cuda_public.py``); here only
the errors and the CPU defaults, which need neither a GPU nor the simulator.
"""
from __future__ import annotations

import numpy as np
import pytest

from retrokv import backend, methods
from retrokv.baselines import IVFIndex, StreamingLLM
from retrokv.dense import DenseIndex
from retrokv.graph_index import GraphIndex
from retrokv.lazy import DocumentStore
from retrokv.wave_buffer import WaveBuffer
from retrokv.wave_index import WaveIndex

RNG = np.random.default_rng(0)
K = RNG.standard_normal((2, 40, 8)).astype(np.float32)
V = RNG.standard_normal((2, 40, 8)).astype(np.float32)

BUILDERS = {
    "WaveIndex": lambda **kw: WaveIndex.build(K, V, **kw),
    "DenseIndex": lambda **kw: DenseIndex.build(K, V, **kw),
    "methods.build": lambda **kw: methods.build("wave", K, V, **kw),
    "DocumentStore": lambda **kw: DocumentStore(**kw),
}


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:0", 0, True, ""])
@pytest.mark.parametrize("what", sorted(BUILDERS))
def test_bad_device_names_the_argument(what, bad):
    with pytest.raises(ValueError, match=r"device must be None .*'cpu' or 'cuda', got"):
        BUILDERS[what](device=bad)


@pytest.mark.parametrize("what", sorted(BUILDERS))
def test_cuda_with_the_reference_backend_says_the_reference_is_numpy(what):
    with pytest.raises(ValueError, match="device='cuda' needs backend='fast'.*reference backend is NumPy"):
        BUILDERS[what](device="cuda", backend="reference")


def test_impl_picks_the_cuda_module_only_for_cuda():
    assert backend.impl("fast", "wave_index").__name__ == "retrokv.fast.wave_index"
    assert backend.impl("fast", "wave_index", "cpu").__name__ == "retrokv.fast.wave_index"
    assert backend.impl("reference", "wave_index", None).__name__ == "retrokv.reference.wave_index"
    with pytest.raises(ValueError, match="got 'tpu'"):
        backend.impl("fast", "wave_index", "tpu")


@pytest.mark.parametrize("cls", [StreamingLLM, IVFIndex])
def test_cpu_only_indexes_refuse_cuda(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__} runs on the CPU only"):
        cls.build(K, V, device="cuda", backend="fast")


def test_graph_index_on_cuda_needs_the_fast_backend():
    q = RNG.standard_normal((2, 6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="device='cuda' needs backend='fast'"):
        GraphIndex.build(K, V, q, device="cuda", backend="reference")
    with pytest.raises(ValueError, match="device must be None"):
        methods.build("graph", K, V, q, device="gpu", backend="fast")


def test_cpu_is_the_default_for_numpy_input():
    idx = WaveIndex.build(K, V, backend="fast", device="cpu", n_local=8)
    assert idx.device == "cpu" and DenseIndex.build(K, V).device == "cpu"
    assert WaveBuffer(idx).device == "cpu"
    assert DocumentStore().device is None            # decided by the first arrays


def test_buffer_device_must_be_the_index_device():
    idx = WaveIndex.build(K, V, n_local=8)
    with pytest.raises(ValueError, match="device='cuda' differs from the index's device 'cpu'"):
        WaveBuffer(idx, device="cuda")
    with pytest.raises(ValueError, match="device must be None"):
        WaveBuffer(idx, device="gpu")


def test_cuda_without_cupy_or_simulator_says_what_is_missing():
    pytest.importorskip("numba")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed: the CUDA path is the cudasim ring's and the gpu marker's")
    except ImportError:
        pass
    import numba

    if numba.config.ENABLE_CUDASIM:
        pytest.skip("under the simulator NumPy arrays stand for device arrays")
    with pytest.raises(ImportError, match="device='cuda' needs CuPy and an NVIDIA GPU"):
        WaveIndex.build(K, V, backend="fast", device="cuda", n_local=8)
