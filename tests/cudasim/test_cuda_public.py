"""The public classes on the CUDA path (``device="cuda"``): same results as the NumPy reference.

Under the simulator the "device arrays" are NumPy arrays and the kernels of ``retrokv.fast.cuda`` run in
Numba's CUDA simulator; on a GPU the same tests run on CuPy arrays. Each test also checks that the CUDA
modules were the ones used (a spy on one kernel entry point), and that the statistics are host values.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from retrokv.dense import DenseIndex
from retrokv.fast.cuda import attention as cu_attention, lazy as cu_lazy, wave_index as cu_wave
from retrokv.lazy import DocumentStore, LazyConfig
from retrokv.wave_buffer import WaveBuffer
from retrokv.wave_index import WaveIndex


def host(x):
    return x.get() if type(x).__module__.split(".")[0] == "cupy" else np.asarray(x)


def close(got, want):
    got = host(got)
    assert got.shape == want.shape and np.array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=2e-5, rtol=2e-5)


def spy(monkeypatch, module, name, calls=None):
    """Record the calls of ``module.name`` (the CUDA entry point the public class must reach) in ``calls``."""
    calls = [] if calls is None else calls
    real = getattr(module, name)

    def counted(*a, **k):
        calls.append(name)
        return real(*a, **k)
    monkeypatch.setattr(module, name, counted)
    return calls


@st.composite
def wave_case(draw):
    hkv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d, dv = draw(st.sampled_from([4, 8])), draw(st.sampled_from([3, 8]))
    n = draw(st.integers(0, 90))
    cfg = dict(min_index_tokens=0, n_sink=draw(st.integers(0, 3)), n_local=draw(st.integers(0, 10)), tokens_per_cluster=8,
               segment_tokens=48, kmeans_iters=2, update_every=draw(st.sampled_from([8, 16])), update_clusters=2,
               retrieval_clusters=draw(st.integers(0, 3)), estimation_clusters=draw(st.integers(0, 4)))
    if draw(st.booleans()):      # the ball-bound ranking, mixed or not: radii from the CUDA kernel, redone per update
        cfg.update(radius_weight=0.5, ball_share=draw(st.sampled_from([1.0, 0.5])),
                   group_rank=draw(st.sampled_from(["softmax_sum", "max_logit"])))
    return hkv, g, d, dv, n, cfg, draw(st.floats(0.0, 0.5)), draw(st.integers(0, 2**31 - 1))


def attend_both(ref, dev, q, ref_buf=None, dev_buf=None, dev_q=None):
    """``q`` (host) to the reference index; ``dev_q`` (a device copy) or the host ``q`` itself to the CUDA one
    (a CPU index refuses a CuPy query, so each side gets its own)."""
    want = ref.attend(q, return_lse=True, buffer=ref_buf)
    got = dev.attend(q if dev_q is None else dev_q, return_lse=True, buffer=dev_buf)
    close(got[0], want[0])
    close(got[1], want[1])
    a, b = ref.last_stats, dev.last_stats
    assert type(b.tokens_attended) is int and isinstance(b.retrieval_clusters, np.ndarray)
    assert all(isinstance(x, np.ndarray) for x in b.exact_ids)
    assert (a.tokens_attended, a.zones, a.bytes_read) == (b.tokens_attended, b.zones, b.bytes_read)
    np.testing.assert_array_equal(a.retrieval_clusters, b.retrieval_clusters)
    np.testing.assert_array_equal(a.estimation_clusters, b.estimation_clusters)


@settings(max_examples=6, deadline=None)
@given(wave_case())
def test_wave_index_build_append_and_buffer_match_reference(arrays, case):
    """Build, attend, appends that trigger index updates, and a wave buffer with misses and then hits."""
    hkv, g, d, dv, n, cfg, frac, seed = case
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((hkv, n, d)).astype(np.float32), rng.standard_normal((hkv, n, dv)).astype(np.float32)
    ref = WaveIndex.build(k, v, backend="reference", **cfg)
    dev = WaveIndex.build(arrays.dev(k), arrays.dev(v), backend="fast", device="cuda", **cfg)
    assert dev.device == "cuda" and dev.n_clusters == ref.n_clusters
    q = rng.standard_normal((hkv * g, d)).astype(np.float32)
    attend_both(ref, dev, q)
    kk, vv = rng.standard_normal((hkv, 20, d)).astype(np.float32), rng.standard_normal((hkv, 20, dv)).astype(np.float32)
    assert ref.append(kk, vv) == dev.append(arrays.dev(kk), arrays.dev(vv))       # >= 1 update at 20 tokens
    assert dev.n_clusters == ref.n_clusters and dev.n_tokens == ref.n_tokens
    rb, db = WaveBuffer(ref, cache_fraction=frac, block_size=4), WaveBuffer(dev, cache_fraction=frac, block_size=4)
    assert db.device == "cuda"
    for step in range(3):                           # the same query twice: the second step can hit
        q = rng.standard_normal((hkv * g, d)).astype(np.float32) if step != 2 else q
        attend_both(ref, dev, q, rb, db, dev_q=arrays.dev(q))
        a, b = rb.stats, db.stats
        assert (a.hits, a.misses, a.admitted, a.evicted, a.bytes_h2d) == (b.hits, b.misses, b.admitted, b.evicted,
                                                                         b.bytes_h2d)
    for h in range(hkv):
        np.testing.assert_array_equal(rb.cached_clusters(h), db.cached_clusters(h))


def test_wave_index_runs_the_cuda_kernels(arrays, monkeypatch):
    """device='cuda' with NumPy input (the simulator's device arrays) reaches retrokv.fast.cuda, GQA G=4."""
    ranked, built = spy(monkeypatch, cu_wave, "rank_clusters"), spy(monkeypatch, cu_wave, "build_meta_index")
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((2, 80, 8)).astype(np.float32), rng.standard_normal((2, 80, 8)).astype(np.float32)
    cfg = dict(min_index_tokens=0, n_local=8, tokens_per_cluster=8, segment_tokens=64, kmeans_iters=2, retrieval_clusters=2,
               estimation_clusters=3)
    dev = WaveIndex.build(k, v, backend="fast", device="cuda", **cfg)
    q = rng.standard_normal((8, 8)).astype(np.float32)
    out = dev.attend(q)
    assert built and ranked
    assert type(out).__module__.split(".")[0] == arrays.m.__name__       # stays on the device
    close(out, WaveIndex.build(k, v, backend="reference", **cfg).attend(q))
    assert "device='cuda'" in repr(dev)
    # the ball-bound ranking mixed with the plain one (radii from the CUDA kernel) picks the reference's zones
    mix = dict(cfg, radius_weight=0.5, ball_share=0.5, group_rank="max_logit")
    dev, ref = (WaveIndex.build(k, v, backend=b, device=dv, **mix) for b, dv in (("fast", "cuda"), ("reference", None)))
    close(dev.attend(q), ref.attend(q))
    np.testing.assert_array_equal(dev.last_stats.retrieval_clusters, ref.last_stats.retrieval_clusters)
    np.testing.assert_array_equal(dev.last_stats.estimation_clusters, ref.last_stats.estimation_clusters)


def test_dense_index_matches_reference(arrays, monkeypatch):
    calls = spy(monkeypatch, cu_attention, "partial_attention")
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 13, 8)).astype(np.float32), rng.standard_normal((2, 13, 5)).astype(np.float32)
    ref = DenseIndex.build(k, v, backend="reference")
    dev = DenseIndex.build(arrays.dev(k), arrays.dev(v), backend="fast")          # CuPy/device input: inferred
    if arrays.name == "numpy":                      # NumPy means the CPU unless the caller asks for the GPU
        assert dev.device == "cpu"
        dev = DenseIndex.build(k, v, backend="fast", device="cuda")
    assert dev.device == "cuda"
    for _ in range(20):                             # appends past the initial capacity (the buffers grow)
        t = rng.standard_normal((2, 2, 8)).astype(np.float32), rng.standard_normal((2, 2, 5)).astype(np.float32)
        ref.append(*t)
        dev.append(*(arrays.dev(x) for x in t))
    q = rng.standard_normal((6, 8)).astype(np.float32)
    want, got = ref.attend(q, return_lse=True), dev.attend(arrays.dev(q), return_lse=True)
    close(got[0], want[0])
    close(got[1], want[1])
    assert calls and ref.last_stats == dev.last_stats


def test_document_store_matches_reference(arrays, monkeypatch):
    calls = spy(monkeypatch, cu_lazy, "lazy_decode_attention")
    spy(monkeypatch, cu_lazy, "lazy_prefill_attention", calls)
    rng = np.random.default_rng(3)
    docs = {(1, 2, 3, 4, 5): 5, (9, 8, 7, 6, 5, 4, 3): 7, (): 0}
    kv = {t: (rng.standard_normal((1, 2, n, 8)).astype(np.float32), rng.standard_normal((1, 2, n, 6)).astype(np.float32))
          for t, n in docs.items()}
    q = rng.standard_normal((4, 2, 8)).astype(np.float32)
    kt, vt = rng.standard_normal((2, 3, 8)).astype(np.float32), rng.standard_normal((2, 3, 6)).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        store = DocumentStore(LazyConfig(theta=1e4, block=4), backend="fast" if device == "cuda" else "reference",
                              device=device)
        put = (lambda x: x) if device == "cpu" else arrays.dev
        for t, (k, v) in kv.items():
            store.put(list(t), put(k), put(v))
        store.put([1, 2, 3, 4, 5], put(kv[(1, 2, 3, 4, 5)][0]), put(kv[(1, 2, 3, 4, 5)][1]))   # reused as is
        req = store.request([[9, 8, 7, 6, 5, 4, 3], [], [1, 2, 3, 4, 5]], start=3)
        results.append((store.prefill_attention(req, put(q), put(kt), put(vt)),
                        store.decode_attention(req, put(q[:, 0]), put(kt), put(vt)),
                        store.read([1, 2, 3, 4, 5])[0]))
        assert store.device == device and store.stats.reused == 1
    for got, want in zip(results[1], results[0]):
        close(got, want)
    assert len(calls) == 2


def test_wave_buffer_misses_then_hits(arrays, monkeypatch):
    """The same query twice through a half-size cache: misses first, then hits from the device tier."""
    rng = np.random.default_rng(4)
    k, v = rng.standard_normal((2, 100, 8)).astype(np.float32), rng.standard_normal((2, 100, 8)).astype(np.float32)
    cfg = dict(min_index_tokens=0, n_local=8, tokens_per_cluster=8, segment_tokens=64, kmeans_iters=2, retrieval_clusters=3,
               estimation_clusters=2)
    ref, dev = WaveIndex.build(k, v, backend="reference", **cfg), WaveIndex.build(k, v, backend="fast", device="cuda",
                                                                                  **cfg)
    rb, db = WaveBuffer(ref, cache_fraction=0.5, block_size=4), WaveBuffer(dev, cache_fraction=0.5, block_size=4)
    from retrokv.fast.cuda import wave_buffer as cu_buffer
    filled = spy(monkeypatch, cu_buffer, "fill_execution_buffer")
    q = rng.standard_normal((4, 8)).astype(np.float32)
    for _ in range(2):
        attend_both(ref, dev, q, rb, db)
    assert len(filled) == 2 and db.history[0].misses > 0 and db.history[1].hits > 0
    assert [s.hits for s in db.history] == [s.hits for s in rb.history]
    for h in range(2):
        for i in range(dev.n_clusters):
            for got, want in zip(db.read_cluster(h, i), rb.read_cluster(h, i)):
                np.testing.assert_array_equal(host(got), want)


def test_graph_index_co_execution_matches_the_cpu_index(arrays, monkeypatch):
    """RetrievalAttention §3.3 on a GPU: static tokens on the device, graph search on the CPU, LSE merge."""
    from retrokv.fast.cuda import graph_index as cu_graph
    from retrokv.graph_index import GraphIndex

    calls = spy(monkeypatch, cu_graph, "co_attention")
    rng = np.random.default_rng(5)
    k, v = rng.standard_normal((2, 60, 8)).astype(np.float32), rng.standard_normal((2, 60, 6)).astype(np.float32)
    pq = rng.standard_normal((4, 12, 8)).astype(np.float32)
    cfg = dict(n_sink=2, n_recent=8, top_k=5)
    cpu = GraphIndex.build(k, v, pq, backend="fast", **cfg)
    dev = GraphIndex.build(arrays.dev(k), arrays.dev(v), arrays.dev(pq), backend="fast", device="cuda", **cfg)
    assert dev.device == "cuda" and isinstance(dev._ikeys, np.ndarray)      # the indexed KV stays on the host
    for _ in range(20):                                   # appends past the static buffer's capacity
        t = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((2, 6)).astype(np.float32)
        cpu.append(*t)
        dev.append(*(arrays.dev(x) for x in t))
    q = rng.standard_normal((4, 8)).astype(np.float32)
    want, got = cpu.attend(q, return_lse=True), dev.attend(arrays.dev(q), return_lse=True)
    close(got[0], want[0])
    close(got[1], want[1])
    assert calls and cpu.last_stats == dev.last_stats
    np.testing.assert_array_equal(host(dev.search(arrays.dev(q))[0]), cpu.search(q)[0])
