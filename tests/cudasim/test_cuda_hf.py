"""``retrokv.hf.attach(..., device="cuda")``: a tiny random Llama decodes through the CUDA kernels.

Under the simulator the model stays on the CPU and the "device arrays" are NumPy arrays (uploaded by
``device="cuda"``, which is then a no-op); on a GPU (``gpu`` marker) the model is on CUDA and the
tensors cross to CuPy and back by DLPack.
"""
from __future__ import annotations

import numpy as np
import pytest

from cuda_helpers import GPU
from retrokv import hf
from retrokv.fast.cuda import wave_index as cu_wave
from retrokv.wave_index import WaveConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = WaveConfig(min_index_tokens=0, n_local=8, tokens_per_cluster=8, segment_tokens=64, kmeans_iters=2, retrieval_clusters=2,
                 estimation_clusters=2)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    return model.to("cuda") if GPU else model


def generate(model, ids, **attach):
    handle = hf.attach(model, "wave", config=CFG, **attach)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                 pad_token_id=0)
        handle.devices = {idx.device for per_layer in handle.indexes.values() for idx in per_layer}
    finally:
        hf.detach(model)
    return out.cpu().numpy(), handle


def test_attach_on_the_cuda_path_generates_like_the_reference(monkeypatch):
    calls = []
    real = cu_wave.rank_clusters
    monkeypatch.setattr(cu_wave, "rank_clusters", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_llama()
    ids = torch.randint(1, 64, (1, 32), generator=torch.Generator().manual_seed(1)).to(model.device)
    want, ref = generate(model, ids, backend="reference", device="cpu") if not GPU else (None, None)
    got, handle = generate(model, ids, backend="fast", device="cuda")
    assert calls, "the decode steps did not reach retrokv.fast.cuda"
    assert handle.devices == {"cuda"}
    if want is not None:
        np.testing.assert_array_equal(got, want)
        for layer, stats in ref.layer_stats().items():
            assert handle.layer_stats()[layer]["tokens_attended"] == stats["tokens_attended"]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs CuPy and an NVIDIA GPU")
def test_decode_step_stays_on_the_gpu():
    """On a GPU the decode step's tensors cross by DLPack both ways: CuPy in, a CUDA tensor out."""
    import cupy

    from retrokv.hf import _arr

    x = torch.randn(2, 3, device="cuda")
    assert isinstance(_arr(x, "cuda"), cupy.ndarray)
    model = tiny_llama()
    ids = torch.randint(1, 64, (1, 32), device="cuda")
    got, handle = generate(model, ids, backend="fast")          # device inferred from the CUDA model
    assert handle.devices == {"cuda"} and got.shape == (1, 35)
