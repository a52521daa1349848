"""Baselines (StreamingLLM, exact top-k, IVF, Quest): oracle properties, fast == reference, validation."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import retrokv.fast.baselines as fb
import retrokv.reference.baselines as rb
from retrokv.baselines import IVFConfig, IVFIndex, QuestIndex, StreamingLLM, TopKOracle
from retrokv.testing.oracles import attention_oracle as full64   # float64 decode attention and its lse


@st.composite
def layers(draw, max_n=300):
    hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    n = draw(st.integers(0, max_n))
    d = draw(st.sampled_from([4, 8, 17]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((hkv, n, d)).astype(np.float32)
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    q = (2 * rng.standard_normal((hkv * g, d))).astype(np.float32)
    return q, k, v


def brute_topk(q3, keys, k):
    hq, b, _ = q3.shape
    g = hq // keys.shape[0]
    out = np.full((hq, b, k), -1)
    for h in range(hq):
        s = q3[h] @ keys[h // g].T
        for i in range(b):
            order = np.lexsort((np.arange(s.shape[1]), -s[i].astype(np.float64)))[:k]
            out[h, i, :len(order)] = order
    return out


@given(st.integers(1, 6), st.integers(1, 60), st.integers(1, 70), st.integers(0, 2**31 - 1))
def test_select_topk_ties_and_backends_agree(r, n, k, seed):
    # small integers force ties: both backends must break them by the lower id
    scores = np.random.default_rng(seed).integers(-3, 4, size=(r, n)).astype(np.float32)
    ref = rb.select_topk(scores, k)
    expect = np.stack([np.lexsort((np.arange(n), -row))[:min(k, n)] for row in scores])
    np.testing.assert_array_equal(ref, expect)
    np.testing.assert_array_equal(fb.select_topk(scores, k), ref)


@given(layers(), st.integers(1, 40))
def test_exact_topk_matches_brute_force(data, k):
    q, keys, _ = data
    q3 = q[:, None]
    expect = brute_topk(q3, keys, k)
    for impl in (rb, fb):
        ids, scanned = impl.exact_topk(q3, keys, k)
        np.testing.assert_array_equal(ids, expect)
        assert (scanned == keys.shape[1]).all()


@given(layers(), st.sampled_from(["reference", "fast"]))
def test_topk_with_every_key_is_full_attention(data, backend):
    q, k, v = data
    assume(k.shape[1] > 0)
    idx = TopKOracle.build(k, v, n_sink=3, n_recent=5, top_k=k.shape[1], backend=backend)
    out, lse = idx.attend(q, return_lse=True)
    o64, l64 = full64(q, k, v)
    np.testing.assert_allclose(out, o64, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, l64, atol=2e-5, rtol=1e-5)
    assert idx.last_stats.density == pytest.approx(1.0)


@given(layers(), st.sampled_from(["reference", "fast"]))
def test_streaming_is_attention_over_sink_and_window(data, backend):
    q, k, v = data
    n = k.shape[1]
    idx = StreamingLLM.build(k, v, n_sink=2, n_recent=7, backend=backend)
    rng = np.random.default_rng(n)
    allk, allv = k, v
    for _ in range(4):                      # generated tokens slide the window
        nk = rng.standard_normal(k.shape[::2]).astype(np.float32)
        nv = rng.standard_normal(k.shape[::2]).astype(np.float32)
        idx.append(nk, nv)
        allk = np.concatenate([allk, nk[:, None]], 1)
        allv = np.concatenate([allv, nv[:, None]], 1)
    total = n + 4
    keep = sorted(set(range(min(2, total))) | set(range(max(0, total - 7), total)))
    np.testing.assert_array_equal(idx.static_positions, keep)
    o64, _ = full64(q, allk[:, keep], allv[:, keep])
    np.testing.assert_allclose(idx.attend(q), o64, atol=2e-5, rtol=1e-4)
    assert idx.last_stats.keys_scored == 0


@given(layers(), st.integers(1, 30))
def test_ivf_full_probe_is_exact_and_recall_grows_with_nprobe(data, k):
    q, keys, v = data
    idx = IVFIndex.build(keys, v, n_sink=0, n_recent=0, n_lists=7, backend="reference")
    exact, _ = TopKOracle.build(keys, v, n_sink=0, n_recent=0, backend="reference").search(q, k)
    ids, scanned = idx.search(q, k, nprobe=idx.n_lists)
    np.testing.assert_array_equal(ids, exact)
    assert (scanned == keys.shape[1]).all()
    recalls = []
    for nprobe in range(1, idx.n_lists + 1):
        got, _ = idx.search(q, k, nprobe=nprobe)
        recalls.append(np.mean([len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(got, exact)]))
    assert all(a <= b for a, b in zip(recalls, recalls[1:]))


@given(layers(), st.integers(1, 30), st.integers(1, 6))
def test_ivf_fast_equals_reference(data, k, nprobe):
    q, keys, v = data
    ref = IVFIndex.build(keys, v, n_sink=4, n_recent=4, top_k=k, nprobe=nprobe, backend="reference")
    fast = IVFIndex.build(keys, v, n_sink=4, n_recent=4, top_k=k, nprobe=nprobe, backend="fast")
    np.testing.assert_array_equal(fast.centroids, ref.centroids)
    for a, b in zip(fast.search(q[:, None].repeat(3, 1)), ref.search(q[:, None].repeat(3, 1))):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fast.attend(q), ref.attend(q), atol=1e-5, rtol=1e-4)
    assert fast.last_stats == ref.last_stats


@given(layers(), st.integers(1, 20), st.sampled_from([1, 3, 16]))
def test_quest_bound_and_backends(data, n_pages, page):
    q, keys, v = data
    kmin, kmax = rb.quest_metadata(keys, page)
    q3 = q[:, None]
    bounds = rb.quest_bounds(q3, kmin, kmax)                    # (Hq, 1, P)
    np.testing.assert_allclose(fb.quest_bounds(q3, kmin, kmax), bounds, rtol=1e-5, atol=1e-4)
    g = q.shape[0] // keys.shape[0]
    for h in range(q.shape[0]):
        s = keys[h // g] @ q[h]                                   # (n,)
        for j in range(kmin.shape[1]):                            # the bound holds for every key of the page
            assert (s[j * page:(j + 1) * page] <= bounds[h, 0, j] + 1e-4 * (1 + abs(bounds[h, 0, j]))).all()
    ref = QuestIndex.build(keys, v, n_sink=2, n_recent=3, page_size=page, token_budget=n_pages * page,
                           top_k=5, backend="reference")
    fast = QuestIndex.build(keys, v, n_sink=2, n_recent=3, page_size=page, token_budget=n_pages * page,
                            top_k=5, backend="fast")
    for a, b in zip(fast.search(q), ref.search(q)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fast.attend(q), ref.attend(q), atol=1e-5, rtol=1e-4)
    # every page read: Quest's attention is full attention
    if keys.shape[1]:
        every = QuestIndex.build(keys, v, n_sink=2, n_recent=3, page_size=page, token_budget=keys.shape[1] * page)
        np.testing.assert_allclose(every.attend(q), full64(q, keys, v)[0], atol=2e-5, rtol=1e-4)


def test_append_joins_static_window(rng):
    k = rng.standard_normal((2, 50, 8)).astype(np.float32)
    v = rng.standard_normal((2, 50, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    idx = TopKOracle.build(k, v, n_sink=4, n_recent=4, top_k=100)
    nk, nv = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((2, 8)).astype(np.float32)
    idx.append(nk, nv)
    assert idx.n_tokens == 51 and idx.static_positions[-1] == 50
    allk = np.concatenate([k, nk[:, None]], 1)
    allv = np.concatenate([v, nv[:, None]], 1)
    np.testing.assert_allclose(idx.attend(q), full64(q, allk, allv)[0], atol=2e-5)


def test_validation_errors(rng):
    k = rng.standard_normal((2, 20, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="keys and values"):
        IVFIndex.build(k, k[:, :5])
    with pytest.raises(ValueError, match="keys must have shape"):
        TopKOracle.build(k[0], k[0])
    with pytest.raises(TypeError, match="floating"):
        TopKOracle.build(k.astype(np.int32), k)
    with pytest.raises(ValueError, match="nprobe"):
        IVFConfig(nprobe=0)
    with pytest.raises(TypeError, match="unknown IVFConfig"):
        IVFIndex.build(k, k, n_probe=3)
    with pytest.raises(ValueError, match="backend"):
        IVFIndex.build(k, k, backend="gpu")
    idx = TopKOracle.build(k, k)
    with pytest.raises(ValueError, match="Hq a positive multiple"):
        idx.attend(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="append expects"):
        idx.append(np.zeros((2, 7), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(NotImplementedError):
        StreamingLLM.build(k, k).search(np.zeros((2, 8), np.float32))


# ---- issue 13: numbers in the configs ------------------------------------------------------------------

def test_quest_budget_below_one_page_is_refused(rng):
    """``QuestConfig(token_budget=8, page_size=16)`` used to read a whole 16-token page silently."""
    from retrokv.baselines import QuestConfig

    with pytest.raises(ValueError, match=r"token_budget must be >= page_size \(16\).*got token_budget=8"):
        QuestConfig(token_budget=8, page_size=16)
    k = rng.standard_normal((1, 200, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="token_budget"):
        QuestIndex.build(k, k, page_size=16, token_budget=15)
    # a budget that is not a multiple is rounded down to whole pages (documented)
    idx = QuestIndex.build(k, k, n_sink=0, n_recent=0, page_size=16, token_budget=40)
    assert idx.n_pages == 2
    idx.attend(rng.standard_normal((1, 8)).astype(np.float32))
    assert idx.last_stats.tokens_attended == 32


def test_ivf_probe_fraction_refuses_bools_and_accepts_numpy_floats():
    with pytest.raises(TypeError, match="probe_fraction"):
        IVFConfig(probe_fraction=True)
    with pytest.raises(ValueError, match="probe_fraction"):
        IVFConfig(probe_fraction=0.0)
    cfg = IVFConfig(probe_fraction=np.float32(0.25))
    assert cfg.probe_fraction == 0.25 and type(cfg.probe_fraction) is float
