"""LazyAttention: lazy prefill/decode equal Block-Attention, reuse needs no new KV, fast equals reference, real model."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import retrokv as rk
from retrokv.lazy import DocumentStore, LazyConfig, LazyRequest, StaleRequestError

BACKENDS = ["reference", "fast"]


def make_docs(rng, lengths, hkv, d, layers=1):
    """Documents prefilled alone: keys rotated to local positions 0..L-1 (document-local RoPE), plus pre-RoPE keys."""
    docs = []
    for i, n in enumerate(lengths):
        tokens = list(range(1000 * (i + 1), 1000 * (i + 1) + n))
        k_pre = rng.standard_normal((layers, hkv, n, d)).astype(np.float32)
        k = rk.apply_rope(k_pre, np.arange(n), theta=1e4) if n else k_pre
        v = rng.standard_normal((layers, hkv, n, d)).astype(np.float32)
        docs.append((tokens, k, v, k_pre))
    return docs


@st.composite
def workloads(draw):
    hkv = draw(st.integers(1, 2))
    g = draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 8, 16]))
    lengths = draw(st.lists(st.integers(0, 40), min_size=0, max_size=4))
    t = draw(st.integers(1, 5))
    m = t + draw(st.integers(0, 3))
    start = draw(st.integers(0, 50))
    block = draw(st.sampled_from([1, 4, 16]))
    convention = draw(st.sampled_from(["half", "interleaved"]))
    seed = draw(st.integers(0, 2**31 - 1))
    order = draw(st.permutations(range(len(lengths))))
    return dict(hkv=hkv, g=g, d=d, lengths=lengths, t=t, m=m, start=start, block=block,
                convention=convention, seed=seed, order=order)


def setup(w, backend="reference"):
    rng = np.random.default_rng(w["seed"])
    store = DocumentStore(LazyConfig(block=w["block"], theta=1e4, convention=w["convention"]), backend=backend)
    docs = make_docs(rng, w["lengths"], w["hkv"], w["d"])
    for tokens, k, v, _ in docs:
        store.put(tokens, k, v)
    req = store.request([docs[i][0] for i in w["order"]], start=w["start"]) if docs else store.request([], w["start"])
    hq = w["hkv"] * w["g"]
    q = rng.standard_normal((hq, w["t"], w["d"])).astype(np.float32)
    kt = rng.standard_normal((w["hkv"], w["m"], w["d"])).astype(np.float32)
    vt = rng.standard_normal((w["hkv"], w["m"], w["d"])).astype(np.float32)
    return store, docs, req, q, kt, vt


@given(workloads())
def test_lazy_prefill_and_decode_equal_block_attention(w):
    if not w["lengths"]:
        w["lengths"] = [3]
        w["order"] = [0]
    store, _, req, q, kt, vt = setup(w)
    lazy = store.prefill_attention(req, q, kt, vt)
    block = store.block_attention(req, q, kt, vt)
    assert lazy.shape == q.shape and lazy.dtype == np.float32
    np.testing.assert_allclose(lazy, block, atol=1e-5)
    lazy_d = store.decode_attention(req, q[:, 0], kt, vt)
    np.testing.assert_allclose(lazy_d, store.block_attention(req, q[:, 0], kt, vt), atol=1e-5)
    # an empty tail in decode (nothing generated yet after the documents) is allowed
    np.testing.assert_allclose(store.decode_attention(req, q[:, 0], kt[:, :0], vt[:, :0]),
                               store.block_attention(req, q[:, 0], kt[:, :0], vt[:, :0]), atol=1e-5)


@given(workloads())
def test_fast_equals_reference(w):
    ref = setup(w, "reference")
    fast = setup(w, "fast")
    store_r, _, req_r, q, kt, vt = ref
    store_f, _, req_f, *_ = fast
    np.testing.assert_array_equal(req_r.table, req_f.table)
    np.testing.assert_allclose(store_f.prefill_attention(req_f, q, kt, vt),
                               store_r.prefill_attention(req_r, q, kt, vt), atol=1e-5)
    np.testing.assert_allclose(store_f.decode_attention(req_f, q[:, 0], kt, vt),
                               store_r.decode_attention(req_r, q[:, 0], kt, vt), atol=1e-5)
    if w["lengths"]:
        kf, vf = store_f.materialize(req_f)
        kr, vr = store_r.materialize(req_r)
        np.testing.assert_allclose(kf, kr, atol=1e-5)
        np.testing.assert_array_equal(vf, vr)
    np.testing.assert_allclose(store_f.block_attention(req_f, q, kt, vt),
                               store_r.block_attention(req_r, q, kt, vt), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_documents_split_into_chunks_match_block_attention(backend):
    """Documents longer than one work chunk (1024 keys in the fast kernel), GQA with G = 4, a tile > 16 rows."""
    rng = np.random.default_rng(1)
    w = dict(hkv=2, g=4, d=32, lengths=[1500, 7, 2100], t=6, m=6, start=11, block=16, convention="half",
             seed=3, order=[2, 0, 1])
    store, _, req, q, kt, vt = setup(w, backend)
    np.testing.assert_allclose(store.prefill_attention(req, q, kt, vt), store.block_attention(req, q, kt, vt), atol=1e-5)
    qd = rng.standard_normal((8, 32)).astype(np.float32)
    np.testing.assert_allclose(store.decode_attention(req, qd, kt, vt), store.block_attention(req, qd, kt, vt), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(n=st.integers(1, 40), t=st.integers(1, 6), g=st.integers(1, 3), seed=st.integers(0, 1000))
def test_one_document_at_offset_zero_is_ordinary_causal_attention(backend, n, t, g, seed):
    """[doc; question] with the document at offset 0: the question rows of plain causal attention."""
    rng = np.random.default_rng(seed)
    hkv, d = 2, 16
    k_pre = rng.standard_normal((hkv, n + t, d)).astype(np.float32)
    v = rng.standard_normal((hkv, n + t, d)).astype(np.float32)
    k = rk.apply_rope(k_pre, np.arange(n + t), theta=1e4)                  # the whole sequence, ordinary RoPE
    q = rk.apply_rope(rng.standard_normal((hkv * g, t, d)).astype(np.float32), np.arange(n, n + t), theta=1e4)
    expect = rk.full_attention(q, k, v, causal=True)
    store = DocumentStore(LazyConfig(theta=1e4), backend=backend)
    store.put(list(range(n)), k[:, :n], v[:, :n])
    req = store.request([list(range(n))])
    assert req.question_start == n and list(req.offsets) == [0]
    np.testing.assert_allclose(store.prefill_attention(req, q, k[:, n:], v[:, n:]), expect, atol=1e-5)
    np.testing.assert_allclose(store.decode_attention(req, q[:, -1], k[:, n:], v[:, n:]), expect[:, -1], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_equals_keys_rotated_directly_to_logical_positions(backend):
    """Re-positioning R(S_d) R(i) k = R(S_d + i) k: same as keys rotated from scratch (up to angle rounding)."""
    rng = np.random.default_rng(2)
    docs = make_docs(rng, [9, 30, 17], hkv=1, d=16)
    store = DocumentStore(LazyConfig(theta=1e4), backend=backend)
    for tokens, k, v, _ in docs:
        store.put(tokens, k, v)
    order = [2, 0, 1]
    req = store.request([docs[i][0] for i in order], start=5)
    k_log = np.concatenate([rk.apply_rope(docs[i][3][0], off + np.arange(docs[i][3].shape[2]), theta=1e4)
                            for i, off in zip(order, req.offsets)], axis=1)           # (1, L, d)
    v_log = np.concatenate([docs[i][2][0] for i in order], axis=1)
    q = rk.apply_rope(rng.standard_normal((3, 16)).astype(np.float32), req.question_start, theta=1e4)
    empty = np.zeros((1, 0, 16), np.float32)
    np.testing.assert_allclose(store.decode_attention(req, q, empty, empty), rk.full_attention(q, k_log, v_log), atol=1e-4)


def test_reordering_reuses_the_same_physical_copies():
    rng = np.random.default_rng(4)
    docs = make_docs(rng, [20, 33, 5], hkv=2, d=8, layers=3)
    store = DocumentStore(backend="reference")
    for tokens, k, v, _ in docs:
        store.put(tokens, k, v)
    written, held = store.stats.bytes_written, store.nbytes
    for tokens, k, v, _ in docs:                       # the stored copy is the document-local KV, unchanged
        k_read, v_read = store.read(tokens)
        np.testing.assert_array_equal(k_read, k)
        np.testing.assert_array_equal(v_read, v)
    assert held == sum(k.nbytes + v.nbytes for _, k, v, _ in docs)
    reqs = [store.request([docs[i][0] for i in order]) for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0])]
    for tokens, k, v, _ in docs:                       # a second put of a stored document is a no-op
        assert store.put(tokens, k, v) is store.get(tokens)
    assert store.stats.bytes_written == written and store.nbytes == held and store.stats.reused == 3
    assert store.stats.puts == 6                       # put calls, not documents stored (3 held)
    blocks = {tuple(sorted(r.table[:, 0])) for r in reqs}
    assert len(blocks) == 1                            # every order reads the same physical blocks
    offsets = {(d.key, int(o)) for r in reqs for d, o in zip(r.documents, r.offsets)}
    assert len(offsets) > len(docs)                    # ... at several distinct positions
    assert store.position_aware_nbytes(reqs) > held
    assert store.position_aware_nbytes(reqs[:1]) == held


def test_capacity_evicts_least_recently_used():
    rng = np.random.default_rng(5)
    docs = make_docs(rng, [16, 16, 16], hkv=1, d=4)
    store = DocumentStore(LazyConfig(capacity_tokens=32), backend="reference")
    store.put(*docs[0][:3])
    store.put(*docs[1][:3])
    store.get(docs[0][0])                              # doc 0 becomes most recently used
    store.put(*docs[2][:3])
    assert docs[0][0] in store and docs[2][0] in store and docs[1][0] not in store
    assert store.stats.evictions == 1 and store.n_blocks_used == 2
    with pytest.raises(KeyError, match=r"documents\[1\]"):
        store.request([docs[0][0], docs[1][0]])
    with pytest.raises(ValueError, match="exceeds capacity_tokens"):
        store.put(*make_docs(rng, [40], 1, 4)[0][:3])


def test_positioned_request_does_not_rotate():
    """A position-aware cache stores copies already at their offset: ``positioned=True`` reads them as they are."""
    rng = np.random.default_rng(6)
    (tokens, k, v, _), = make_docs(rng, [12], hkv=1, d=8)
    lazy = DocumentStore(LazyConfig(theta=1e4))
    lazy.put(tokens, k, v)
    req = lazy.request([tokens], start=7)
    k_mat, v_mat = lazy.materialize(req)
    fixed = DocumentStore(LazyConfig(theta=1e4))
    fixed.put(tokens, k_mat, v_mat, key=(tuple(tokens), 7))
    req_p = fixed.request([(tuple(tokens), 7)], start=7, positioned=True)
    assert list(req_p.rotations) == [0] and list(req_p.offsets) == [7]
    q = rng.standard_normal((2, 8)).astype(np.float32)
    e = np.zeros((1, 0, 8), np.float32)
    np.testing.assert_allclose(fixed.decode_attention(req_p, q, e, e), lazy.decode_attention(req, q, e, e), atol=1e-6)


def test_bad_inputs_name_the_argument():
    rng = np.random.default_rng(7)
    (tokens, k, v, _), = make_docs(rng, [5], hkv=2, d=8)
    with pytest.raises(ValueError, match="block"):
        LazyConfig(block=0)
    with pytest.raises(ValueError, match="convention"):
        LazyConfig(convention="neox")
    with pytest.raises(TypeError, match="config"):
        DocumentStore(config={"block": 16})
    with pytest.raises(ValueError, match="backend"):
        DocumentStore(backend="cuda")
    store = DocumentStore()
    q0 = rng.standard_normal((4, 5, 8)).astype(np.float32)     # an empty store: the tail alone, causal
    np.testing.assert_allclose(store.prefill_attention(store.request([]), q0, k[0], v[0]),
                               rk.full_attention(q0, k[0], v[0], causal=True), atol=1e-6)
    with pytest.raises(ValueError, match="tokens has 4"):
        store.put(tokens[:4], k, v)
    with pytest.raises(TypeError, match="tokens"):
        store.put(np.zeros(5), k, v)
    with pytest.raises(TypeError, match="keys"):
        store.put(tokens, k.astype(np.int32), v)
    store.put(tokens, k, v)
    with pytest.raises(ValueError, match="differs from the store"):
        store.put([9, 9, 9, 9, 9], k[:, :1], v[:, :1])
    req = store.request([tokens])
    q = np.zeros((4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="layer"):
        store.prefill_attention(req, q, k[0], v[0], layer=1)
    with pytest.raises(ValueError, match="tail must hold"):
        store.prefill_attention(req, q, k[0][:, :1], v[0][:, :1])
    with pytest.raises(ValueError, match=r"\(Hq, d\)"):
        store.decode_attention(req, q, k[0], v[0])
    with pytest.raises(TypeError, match="LazyRequest"):
        store.decode_attention("req", q[:, 0], k[0], v[0])
    with pytest.raises(ValueError, match="start"):
        store.request([tokens], start=-1)
    assert isinstance(req, LazyRequest)


# ---- real model ----------------------------------------------------------------------------------

def _doc_kv(model, ids):
    """Prefill a document alone from position 0: per-layer keys/values (layers, Hkv, L, d)."""
    import torch

    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    k = np.stack([layer.keys[0].numpy() for layer in cache.layers])
    v = np.stack([layer.values[0].numpy() for layer in cache.layers])
    return k, v


def _lazy_logits(model, store, req, ids):
    """Run question ``ids`` at logical positions with lazy attention over the store's documents."""
    import torch
    from transformers import AttentionInterface, DynamicCache

    def lazy(module, query, key, value, attention_mask, **kwargs):
        q, k, v = query[0].numpy(), key[0].numpy(), value[0].numpy()
        out = store.prefill_attention(req, q, k, v, layer=module.layer_idx)      # (Hq, T, d)
        return torch.from_numpy(out).transpose(0, 1)[None], None

    AttentionInterface.register("retrokv_lazy_test", lazy)
    previous = model.config._attn_implementation
    model.set_attn_implementation("retrokv_lazy_test")
    try:
        with torch.no_grad():
            pos = torch.arange(req.question_start, req.question_start + len(ids))[None]
            return model(torch.tensor([ids]), position_ids=pos, past_key_values=DynamicCache(), use_cache=True).logits[0]
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.model
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_one_document_at_offset_zero_equals_full_forward(smollm2, backend):
    import torch

    from retrokv.harness.data import natural_text_ids

    model, tok = smollm2
    ids = natural_text_ids(tok, 60)
    doc, question = ids[:48], ids[48:]
    store = DocumentStore(LazyConfig(theta=model.config.rope_parameters["rope_theta"]), backend=backend)
    store.put(doc, *_doc_kv(model, doc))
    lazy = _lazy_logits(model, store, store.request([doc]), question).numpy()
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0, len(doc):].numpy()
    assert np.abs(lazy - full).max() <= 1e-3 * np.abs(full).max()
    assert (lazy.argmax(-1) == full.argmax(-1)).all()


@pytest.mark.model
def test_model_lazy_equals_block_attention_materialisation(smollm2):
    import torch
    from transformers import DynamicCache

    from retrokv.harness.data import natural_text_ids

    model, tok = smollm2
    ids = natural_text_ids(tok, 100)
    docs, question = [ids[:30], ids[30:55], ids[55:90]], ids[90:]
    store = DocumentStore(LazyConfig(theta=model.config.rope_parameters["rope_theta"]), backend="fast")
    for d in docs:
        store.put(d, *_doc_kv(model, d))
    req = store.request([docs[2], docs[0], docs[1]])
    lazy = _lazy_logits(model, store, req, question).numpy()
    cache = DynamicCache()
    for layer in range(model.config.num_hidden_layers):   # Block-Attention: re-rotated copies, model's own SDPA
        k, v = store.materialize(req, layer)
        cache.update(torch.from_numpy(k)[None], torch.from_numpy(v)[None], layer)
    pos = torch.arange(req.question_start, req.question_start + len(question))[None]
    with torch.no_grad():
        block = model(torch.tensor([question]), position_ids=pos, past_key_values=cache).logits[0].numpy()
    assert np.abs(lazy - block).max() <= 1e-3 * np.abs(block).max()
    assert (lazy.argmax(-1) == block.argmax(-1)).all()


# ---- issue 13: request lifetime, replacing documents, empty documents, indices and numbers -----------

def _q_tail(rng, hkv=1, g=2, d=8, m=3):
    q = rng.standard_normal((hkv * g, d)).astype(np.float32)
    kt = rng.standard_normal((hkv, m, d)).astype(np.float32)
    vt = rng.standard_normal((hkv, m, d)).astype(np.float32)
    return q, kt, vt


def _every_use(store, req, q, kt, vt):
    """Every store method that reads a request, as (name, thunk)."""
    return [("decode_attention", lambda: store.decode_attention(req, q, kt, vt)),
            ("prefill_attention", lambda: store.prefill_attention(req, q[:, None], kt, vt)),
            ("block_attention", lambda: store.block_attention(req, q, kt, vt)),
            ("materialize", lambda: store.materialize(req))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_after_its_document_was_evicted_raises(backend):
    """Before: doc b reused a's freed blocks and the stale request silently attended to b's KV."""
    rng = np.random.default_rng(20)
    (ta, ka, va, _), (tb, kb, vb, _) = make_docs(rng, [64, 64], hkv=1, d=8)
    store = DocumentStore(LazyConfig(capacity_tokens=64, theta=1e4), backend=backend)
    store.put(ta, ka, va)
    req = store.request([ta])
    store.put(tb, kb, vb)                                    # evicts a, takes its blocks
    assert ta not in store and store.stats.evictions == 1
    q, kt, vt = _q_tail(rng)
    for name, use in _every_use(store, req, q, kt, vt):
        with pytest.raises(StaleRequestError, match=r"documents\[0\].*evicted"):
            use()
    # a request made now is served, and putting a back (a new generation) needs a new request too
    fresh = store.request([tb])
    np.testing.assert_allclose(store.decode_attention(fresh, q, kt, vt), store.block_attention(fresh, q, kt, vt),
                               atol=1e-5)
    store.put(ta, ka, va)                                    # evicts b: fresh is stale now, req stays stale
    for r in (req, fresh):
        with pytest.raises(StaleRequestError):
            store.decode_attention(r, q, kt, vt)
    assert store.stats.bytes_materialized == 64 * 1 * (8 + 8) * 4   # only the block_attention that succeeded


@pytest.mark.parametrize("backend", BACKENDS)
def test_request_from_another_store_raises(backend):
    """Two stores with the same layout: before, the other store served the request from its own blocks."""
    rng = np.random.default_rng(21)
    (ta, ka, va, _), (tb, kb, vb, _) = make_docs(rng, [20, 20], hkv=1, d=8)
    one, two = (DocumentStore(LazyConfig(theta=1e4), backend=backend) for _ in range(2))
    one.put(ta, ka, va)
    two.put(tb, kb, vb)
    req = one.request([ta])
    q, kt, vt = _q_tail(rng)
    for name, use in _every_use(two, req, q, kt, vt):
        with pytest.raises(ValueError, match="another DocumentStore"):
            use()
    two.put(ta, ka, va)                                      # even when the other store holds the document
    with pytest.raises(ValueError, match="another DocumentStore"):
        two.decode_attention(req, q, kt, vt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_put_with_other_content_under_a_stored_key_refuses_or_replaces(backend):
    """Before: put kept the old document (even of another length) and returned it; now it refuses,
    and ``replace=True`` stores the new content as a new generation that makes old requests stale."""
    rng = np.random.default_rng(22)
    (ta, ka, va, _), = make_docs(rng, [12], hkv=1, d=8)
    store = DocumentStore(LazyConfig(theta=1e4), backend=backend)
    key = ("doc",)
    doc = store.put(ta, ka, va, key=key)
    req = store.request([key])
    with pytest.raises(ValueError, match="already stored with length 12, not 5"):
        store.put(ta[:5], ka[:, :, :5], va[:, :, :5], key=key)
    with pytest.raises(ValueError, match="already stored with other tokens"):
        store.put([t + 1 for t in ta], ka, va, key=key)
    with pytest.raises(ValueError, match="already stored with other keys"):
        store.put(ta, ka * 0, va, key=key)
    with pytest.raises(ValueError, match="already stored with other values"):
        store.put(ta, ka, va + 1, key=key)
    store.put(ta, ka, va)                                    # the default key (the tokens) too
    with pytest.raises(ValueError, match="already stored"):
        store.put(ta, ka, va * 2)
    # re-prefill rounding is the same document: reused, requests stay valid
    assert store.put(ta, ka * (1 + 1e-6), va, key=key) is doc and store.get(key).length == 12
    q, kt, vt = _q_tail(rng)
    before = store.decode_attention(req, q, kt, vt)
    new = store.put(ta[:5], ka[:, :, :5], va[:, :, :5] * 3, key=key, replace=True)
    assert new.length == 5 and new.generation > doc.generation and store.stats.replaced == 1
    k_read, v_read = store.read(key)
    np.testing.assert_array_equal(v_read, va[:, :, :5] * 3)
    with pytest.raises(StaleRequestError, match=r"documents\[0\] \(key \('doc',\)\) was replaced"):
        store.decode_attention(req, q, kt, vt)
    with pytest.raises(StaleRequestError, match="older copy"):     # the old Document object names the old one
        store.request([doc])
    after = store.decode_attention(store.request([key]), q, kt, vt)
    assert not np.allclose(after, before)
    with pytest.raises(TypeError, match="replace must be a bool"):
        store.put(ta, ka, va, key=key, replace="yes")
    with pytest.raises(TypeError, match="key must be a tuple"):   # a str key could never be found again
        store.put(ta, ka, va, key="doc")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_document_reads_and_attends_as_nothing(backend):
    """A zero-length document first in a fresh store: read used to fail on the pool that did not exist."""
    rng = np.random.default_rng(23)
    store = DocumentStore(LazyConfig(theta=1e4), backend=backend)
    empty = np.zeros((2, 1, 0, 8), np.float32)                    # 2 layers, 1 KV head, L = 0
    store.put([], empty, empty)
    k, v = store.read([])
    assert k.shape == v.shape == (2, 1, 0, 8) and k.dtype == np.float32
    (t1, k1, v1, _), = make_docs(rng, [7], hkv=1, d=8, layers=2)
    store.put(t1, k1, v1)
    q, kt, vt = _q_tail(rng)
    with_empty = store.decode_attention(store.request([[], t1]), q, kt, vt, layer=1)
    np.testing.assert_allclose(with_empty, store.decode_attention(store.request([t1]), q, kt, vt, layer=1), atol=1e-6)
    only = store.request([[]])
    np.testing.assert_allclose(store.decode_attention(only, q, kt, vt), rk.full_attention(q, kt, vt), atol=1e-6)
    assert store.materialize(only)[0].shape == (1, 0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_must_be_an_int_index(backend):
    """``materialize(req, layer=1.5)`` passed the range check and failed inside NumPy indexing."""
    rng = np.random.default_rng(24)
    (t1, k1, v1, _), = make_docs(rng, [7], hkv=1, d=8, layers=3)
    store = DocumentStore(LazyConfig(theta=1e4), backend=backend)
    store.put(t1, k1, v1)
    req = store.request([t1])
    q, kt, vt = _q_tail(rng)
    for layer, exc in ((1.5, TypeError), (1.0, TypeError), (True, TypeError), ("1", TypeError),
                       (3, ValueError), (-1, ValueError)):
        with pytest.raises(exc, match="layer"):
            store.materialize(req, layer=layer)
        with pytest.raises(exc, match="layer"):
            store.decode_attention(req, q, kt, vt, layer=layer)
    np.testing.assert_array_equal(store.materialize(req, layer=np.int64(2))[1], v1[2])


def test_config_and_request_numbers():
    """NumPy numbers are accepted (and stored as Python numbers); bools are not sizes."""
    cfg = LazyConfig(block=np.int64(8), theta=np.float32(1e5), capacity_tokens=np.int32(64))
    assert cfg.block == 8 and type(cfg.block) is int and cfg.theta == 1e5 and type(cfg.capacity_tokens) is int
    for kwargs in (dict(block=True), dict(block=2.0), dict(theta=True), dict(capacity_tokens=True)):
        with pytest.raises(TypeError, match=next(iter(kwargs))):
            LazyConfig(**kwargs)
    with pytest.raises(ValueError, match="theta"):
        LazyConfig(theta=float("inf"))
    store = DocumentStore()
    store.put([1, 2], np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32))
    assert store.request([[1, 2]], start=np.int64(3)).question_start == 5
    with pytest.raises(TypeError, match="start"):
        store.request([[1, 2]], start=True)
    with pytest.raises(TypeError, match="positioned"):
        store.request([[1, 2]], positioned="no")
    req = store.request([[1, 2]])
    with pytest.raises(ValueError, match="read-only"):     # the kernels trust the table: it cannot be edited
        req.table[0, 0] = 99
