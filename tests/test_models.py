"""Real-model ring: captured SmolLM2 Q/K/V reproduce the model's own attention; capture works on any Llama model."""
from __future__ import annotations

import numpy as np
import pytest

import retrokv as rk

pytestmark = pytest.mark.model


def test_captured_shapes_follow_design(captured):
    assert sorted(captured) == list(range(30))
    layer = captured[7]
    assert layer.q.shape == (9, 1024, 64) and layer.out.shape == (9, 1024, 64)
    for a in (layer.k, layer.v, layer.k_pre):
        assert a.shape == (3, 1024, 64) and a.dtype == np.float32


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("layer", [0, 13, 29])
def test_full_attention_reproduces_the_models_attention(captured, layer, backend):
    c = captured[layer]
    out = rk.full_attention(c.q, c.k, c.v, causal=True, backend=backend)
    assert np.abs(out - c.out).max() <= 1e-4


def test_pre_rope_keys_rotate_to_post_rope_keys(captured):
    c = captured[3]
    k = rk.apply_rope(c.k_pre, np.arange(c.k.shape[1]), theta=1e5)
    scale = np.abs(c.k).max()
    assert np.abs(k - c.k).max() <= 1e-5 * scale * 10


def test_capture_works_on_any_llama_model():
    """A randomly initialised tiny Llama (no download) with batch 2 and GQA: same identities hold."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from retrokv.harness.models import capture_qkv

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e4)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    got = capture_qkv(model, ids, layers=[1])
    assert list(got) == [1]
    c = got[1]
    assert c.q.shape == (8, 12, 16) and c.k.shape == (4, 12, 16)     # batch flattened into heads
    out = rk.full_attention(c.q, c.k, c.v, causal=True)
    assert np.abs(out - c.out).max() <= 1e-5
    with pytest.raises(ValueError, match="layers must be in"):
        capture_qkv(model, ids, layers=[5])
    with pytest.raises(ValueError, match="input_ids must have shape"):
        capture_qkv(model, np.zeros((1, 1, 3), int))
