"""retrokv.hf: methods attached to a real transformers model through its attention registry."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.model

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def prompts(smollm2):
    from retrokv.harness.data import natural_text

    _, tok = smollm2
    text = natural_text()
    return tok([text[:1200] + "\nIn short,", text[9000:9500] + "\nSo"], return_tensors="pt",
               padding=True, padding_side="left")


def _generate(model, tok, enc, **kw):
    import torch

    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=tok.pad_token_id or tok.eos_token_id, **kw)


@pytest.fixture(scope="module")
def plain(smollm2, prompts):
    model, tok = smollm2
    return _generate(model, tok, prompts)


def _single(prompts):
    n = int(prompts.attention_mask[0].sum())
    return {"input_ids": prompts.input_ids[:1, -n:], "attention_mask": prompts.attention_mask[:1, -n:]}


def test_full_method_matches_plain_generate_on_a_left_padded_batch(smollm2, prompts, plain):
    import torch
    from retrokv import hf

    model, tok = smollm2
    before = model.config._attn_implementation
    handle = hf.attach(model, "full", backend="fast")
    try:
        out = _generate(model, tok, prompts)
    finally:
        hf.detach(model)
    assert model.config._attn_implementation == before
    assert torch.equal(out, plain)
    stats = handle.layer_stats()
    assert sorted(stats) == list(range(model.config.num_hidden_layers))
    # 2 sequences x (NEW_TOKENS - 1) decode steps per layer; the first new token comes from the prefill
    assert all(s["steps"] == 2 * (NEW_TOKENS - 1) for s in stats.values())
    assert handle.mean_density() == 1.0


@pytest.mark.parametrize("method", ["wave", "graph"])
def test_budgets_covering_every_token_generate_exactly_like_full_attention(smollm2, prompts, plain, method):
    import torch
    from retrokv import hf
    from retrokv.graph_index import GraphConfig
    from retrokv.wave_index import WaveConfig

    model, tok = smollm2
    single = _single(prompts)
    n = single["input_ids"].shape[1]
    config = (WaveConfig(retrieval_budget=1.0) if method == "wave" else
              GraphConfig(n_sink=4, n_recent=16, top_k=n, search_L=n, n_query_neighbors=16, pool_cap=64))
    handle = hf.attach(model, method, config=config, backend="fast")
    try:
        out = _generate(model, tok, single)
    finally:
        hf.detach(model)
    assert torch.equal(out[0], plain[0])
    # every token was read exactly, and the index (not a dense fallback) served the decode steps
    assert handle.mean_density() == pytest.approx(1.0)
    assert handle.build_calls == model.config.num_hidden_layers


def test_streaming_reads_only_its_window_and_stats_are_per_layer(smollm2, prompts):
    from retrokv import hf
    from retrokv.baselines import StreamingConfig

    model, tok = smollm2
    single = _single(prompts)
    n = single["input_ids"].shape[1]
    cfg = StreamingConfig(n_sink=4, n_recent=32)
    wide = StreamingConfig(n_sink=4, n_recent=48)              # one layer with its own config
    handle = hf.attach(model, "streaming", config=cfg, backend="reference", dense_layers=[0], layer_configs={2: wide})
    try:
        out = _generate(model, tok, single)
    finally:
        hf.detach(model)
    assert out.shape[1] == n + NEW_TOKENS
    stats = handle.layer_stats()
    assert stats[0]["density"] == 1.0                       # the dense layer
    for layer in range(1, model.config.num_hidden_layers):
        # at most sink + recent (+ the appended tokens, which join the recent window) of n..n+7 tokens
        assert 0 < stats[layer]["density"] <= (4 + (48 if layer == 2 else 32) + NEW_TOKENS) / n
    assert stats[2]["density"] > stats[1]["density"]        # layer 2's own config: a longer window read
    # the decode timer counts one call per layer and decode step (the first new token comes from the prefill)
    assert handle.decode_calls == model.config.num_hidden_layers * (NEW_TOKENS - 1)
    assert handle.decode_seconds > 0
    handle.reset_stats()
    assert (handle.decode_calls, handle.decode_seconds, handle.layer_stats()) == (0, 0.0, {})


def test_teacher_forced_decode_logits_match_dense(smollm2, prompts):
    """One token at a time through the method's decode path gives the dense model's logits."""
    import torch
    from retrokv import hf
    from retrokv.wave_index import WaveConfig

    model, _ = smollm2
    ids = _single(prompts)["input_ids"]
    with torch.no_grad():
        dense = model(ids).logits[0, -4:]
        hf.attach(model, "wave", config=WaveConfig(retrieval_budget=1.0), backend="reference")
        try:
            cache = model(ids[:, :-4], use_cache=True).cache
            steps = []
            for t in range(ids.shape[1] - 4, ids.shape[1]):
                o = model(ids[:, t:t + 1], cache=cache, use_cache=True)
                cache = o.cache
                steps.append(o.logits[0, -1])
        finally:
            hf.detach(model)
    np.testing.assert_allclose(torch.stack(steps).numpy(), dense.numpy(), atol=2e-3, rtol=0)


def test_text_streamer_sees_the_generated_text(smollm2, prompts):
    from transformers import TextStreamer
    from retrokv import hf

    model, tok = smollm2
    seen = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            seen.append(text)

    single = _single(prompts)
    hf.attach(model, "topk", backend="fast")
    try:
        out = _generate(model, tok, single, streamer=Collect(tok, skip_prompt=True))
    finally:
        hf.detach(model)
    new = tok.decode(out[0, single["input_ids"].shape[1]:], skip_special_tokens=False)
    assert "".join(seen).strip() == new.strip()


def test_attach_validates_its_arguments(smollm2):
    from retrokv import hf
    from retrokv.wave_index import WaveConfig

    model, _ = smollm2
    with pytest.raises(ValueError, match="method"):
        hf.attach(model, "hnsw")
    with pytest.raises(ValueError, match="dense_layers"):
        hf.attach(model, "wave", dense_layers=[99])
    with pytest.raises(TypeError, match="config"):
        hf.attach(model, "wave", config={"retrieval_budget": 1.0})
    with pytest.raises(ValueError, match="layer_configs"):
        hf.attach(model, "wave", layer_configs={99: None})
    with pytest.raises(TypeError, match=r"layer_configs\[1\]"):
        hf.attach(model, "graph", layer_configs={1: WaveConfig()})
    with pytest.raises(TypeError, match="dict"):
        hf.attach(model, "wave", layer_configs=[WaveConfig()])
    with pytest.raises(TypeError, match="Llama"):
        hf.attach(object(), "wave")
    with pytest.raises(ValueError, match="no retrokv method"):
        hf.detach(model)


def test_index_cache_keeps_no_kv_and_generates_like_dynamic_cache(smollm2, prompts, plain):
    import torch
    from retrokv import hf

    model, tok = smollm2
    single = _single(prompts)
    cache = hf.index_cache()
    hf.attach(model, "full", backend="fast")
    try:
        out = _generate(model, tok, single, cache=cache)
        with pytest.raises(ValueError, match="one prefill"):
            with torch.no_grad():
                model(single["input_ids"][:, :3], cache=cache, use_cache=True)
    finally:
        hf.detach(model)
    assert torch.equal(out[0], plain[0])
    assert cache.get_seq_length() == out.shape[1] - 1          # the last token was never fed back
    assert all(layer.keys.numel() == 0 for layer in cache.layers)


def test_sampling_with_a_seed_matches_plain_sampling(smollm2, prompts):
    import torch
    from retrokv import hf

    model, tok = smollm2
    single = _single(prompts)
    kw = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, temperature=0.8, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model.generate(**single, **kw)
        hf.attach(model, "full", backend="fast")
        try:
            torch.manual_seed(3)
            ours = model.generate(**single, cache=hf.index_cache(), **kw)
        finally:
            hf.detach(model)
    assert torch.equal(ours, plain)


def test_keep_prefill_saves_every_layer_without_building_and_refuses_to_decode(smollm2, prompts):
    """The evaluation harness prefills once on such a handle; it must not build throwaway indexes."""
    import torch
    from retrokv import hf

    model, _ = smollm2
    ids = _single(prompts)["input_ids"]
    handle = hf.attach(model, "full", backend="fast")
    handle.keep_prefill = True
    try:
        with torch.no_grad():
            cache = model(ids, use_cache=True).cache
            with pytest.raises(RuntimeError, match="keep_prefill"):
                model(ids[:, -1:], cache=cache, use_cache=True)
    finally:
        hf.detach(model)
    assert handle.indexes == {} and handle.build_calls == 0
    assert sorted(handle.prefill) == list(range(model.config.num_hidden_layers))
    q, k, v, valid = handle.prefill[0]
    cfg = model.config
    assert k.shape == v.shape == (1, cfg.num_key_value_heads, ids.shape[1], cfg.head_dim)
    assert q.shape == (1, cfg.num_attention_heads, ids.shape[1], cfg.head_dim) and valid.all()


@pytest.mark.parametrize("cache", ["dynamic", "index"])
def test_a_new_generate_with_a_one_token_prompt_starts_a_new_index(smollm2, prompts, cache):
    """A one-token prompt after a long generate is a new sequence, not the next decode step of the old one."""
    import torch
    from retrokv import hf

    model, tok = smollm2
    one = {"input_ids": prompts.input_ids[:1, -1:], "attention_mask": torch.ones((1, 1), dtype=torch.long)}
    want = _generate(model, tok, one)
    hf.attach(model, "wave", backend="fast")
    try:
        _generate(model, tok, _single(prompts), **({"cache": hf.index_cache()} if cache == "index" else {}))
        got = _generate(model, tok, one, **({"cache": hf.index_cache()} if cache == "index" else {}))
    finally:
        hf.detach(model)
    assert torch.equal(got, want)


@pytest.mark.parametrize("cache", ["dynamic", "index"])
def test_beam_search_is_refused_with_a_clear_error(smollm2, prompts, cache):
    """The indexes cannot follow the cache's beam reorders: refuse, never a silent wrong answer or IndexError."""
    from retrokv import hf

    model, tok = smollm2
    hf.attach(model, "full", backend="fast")
    try:
        with pytest.raises(ValueError, match="beam search"):
            _generate(model, tok, _single(prompts), num_beams=2,
                      **({"cache": hf.index_cache()} if cache == "index" else {}))
    finally:
        hf.detach(model)
    plain = _generate(model, tok, _single(prompts), num_beams=2)    # detached: beam search works again
    assert plain.shape[1] > _single(prompts)["input_ids"].shape[1]
