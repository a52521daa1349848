"""RetroInfer wave buffer: never changes results, behaves as a plain LRU over clusters, fast == reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import retrokv as rk
from retrokv.fast import wave_buffer as fast_wb
from retrokv.reference import wave_buffer as ref_wb
from retrokv.reference.wave_index import MetaIndex, concat_meta, empty_meta
from retrokv.wave_index import WaveConfig, WaveIndex

# update_every=32 so that a few hundred decode steps cross several index updates
SMALL = dict(min_index_tokens=0, n_sink=2, n_local=8, tokens_per_cluster=4, segment_tokens=64, kmeans_iters=3, update_every=32,
             update_clusters=4, retrieval_budget=0.1, estimation_budget=0.3)


def drifting_decode(seed, hkv=2, g=2, d=8, n=160, steps=300):
    """Keys drawn from a few topics, queries that drift slowly: consecutive steps retrieve similar clusters."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((hkv, 12, d)).astype(np.float32) * 2
    k = topics[np.arange(hkv)[:, None], rng.integers(0, 12, (hkv, n + steps))]
    k = (k + rng.standard_normal(k.shape)).astype(np.float32)
    v = rng.standard_normal((hkv, n + steps, d)).astype(np.float32)
    q = np.empty((steps, hkv * g, d), np.float32)
    q[0] = rng.standard_normal((hkv * g, d))
    for t in range(1, steps):
        q[t] = 0.95 * q[t - 1] + 0.3 * rng.standard_normal((hkv * g, d))
    return k, v, q, n


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_buffer_never_changes_results(backend):
    """The accuracy-agnostic property (RetroInfer §4.3) over a long decode with index updates."""
    k, v, q, n = drifting_decode(0)
    idx = WaveIndex.build(k[:, :n], v[:, :n], config=WaveConfig(**SMALL), backend=backend)
    buf = rk.WaveBuffer(idx, cache_fraction=0.2)
    c0 = idx.n_clusters
    for t in range(len(q)):
        out, lse = idx.attend(q[t], return_lse=True)
        plain_ids = [x.copy() for x in idx.last_stats.exact_ids]
        out_b, lse_b = idx.attend(q[t], buffer=buf, return_lse=True)
        np.testing.assert_array_equal(out_b, out)               # the same bytes in the same order: bit-equal
        np.testing.assert_array_equal(lse_b, lse)
        for a, b in zip(plain_ids, idx.last_stats.exact_ids):
            assert np.array_equal(a, b)                      # the same tokens, in the same order
        idx.append(k[:, n + t], v[:, n + t])
    s = buf.stats
    assert idx.n_clusters > c0 and buf.n_clusters == idx.n_clusters          # the host tier followed updates
    assert s.step == len(q) and s.total_hits > 0 and s.total_misses > 0
    assert sum(x.evicted for x in buf.history) > 0
    assert 0 < s.total_bytes_h2d < s.total_bytes_no_cache
    assert all(x.cache_blocks_used <= x.cache_blocks for x in buf.history)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_cache_size_extremes(fraction):
    """No cache: every cluster is a miss. A cache as large as the host tier: only compulsory misses."""
    k, v, q, n = drifting_decode(1, steps=40)
    idx = WaveIndex.build(k[:, :n], v[:, :n], config=WaveConfig(**SMALL), backend="fast")
    buf = rk.WaveBuffer(idx, cache_fraction=fraction)
    seen = [set() for _ in range(k.shape[0])]
    for t in range(len(q)):
        idx.attend(q[t], buffer=buf)
        for h, r in enumerate(idx.last_stats.retrieval_clusters):
            seen[h] |= set(r.tolist())
    s = buf.stats
    if fraction == 0.0:
        assert s.total_hits == 0 and s.total_bytes_h2d == s.total_bytes_no_cache and s.cache_blocks == 0
    else:
        assert s.total_misses == sum(len(x) for x in seen) and s.total_hits > 0


def test_index_without_clusters():
    rng = np.random.default_rng(2)
    k, v = rng.standard_normal((2, 2, 10, 4)).astype(np.float32)
    idx = WaveIndex.build(k, v)
    buf = rk.WaveBuffer(idx)
    q = rng.standard_normal((4, 4)).astype(np.float32)
    assert np.array_equal(idx.attend(q, buffer=buf), idx.attend(q))
    assert buf.n_clusters == 0 and buf.stats.retrieved == 0 and math.isnan(buf.stats.hit_ratio)


# ---------------------------------------------------------------------------- LRU model, stateful


def random_meta(rng, hkv, sizes, d=3, first_id=0):
    """A MetaIndex with clusters of the given sizes ``(Hkv, c)`` and distinct random KV (no clustering)."""
    m = int(sizes.sum(axis=1).max())
    offs = np.zeros((hkv, sizes.shape[1] + 1), np.int64)
    offs[:, 1:] = np.cumsum(sizes, axis=1)
    keys = rng.standard_normal((hkv, m, d)).astype(np.float32)
    ids = np.tile(np.arange(first_id, first_id + m), (hkv, 1)).astype(np.int64)
    return MetaIndex(np.zeros((hkv, sizes.shape[1], d), np.float32), np.zeros((hkv, sizes.shape[1], d), np.float32),
                     sizes.astype(np.int64), offs, keys, -keys, ids)


class LRUModel:
    """A plain LRU over clusters counted in blocks, written independently of both implementations."""

    def __init__(self, hkv):
        self.order = [[] for _ in range(hkv)]       # least recent first
        self.blocks, self.capacity = np.zeros((hkv, 0), np.int64), 0

    def access(self, retrieval):
        hits, evicted = [], []
        for h, r in enumerate(retrieval.tolist()):
            order, nb = self.order[h], self.blocks[h]
            hit = [c in order for c in r]
            hits.append(hit)
            for c, was_hit in zip(r, hit):
                if was_hit:
                    continue
                free = self.capacity - sum(nb[x] for x in order)
                if free + sum(nb[x] for x in order if x not in r) < nb[c]:
                    continue
                while free < nb[c]:
                    victim = next(x for x in order if x not in r)
                    order.remove(victim)
                    free += nb[victim]
                    evicted.append((h, victim))
                order.append(c)
            for c in reversed(r):
                if c in order:
                    order.remove(c)
                    order.append(c)
        return np.array(hits, bool).reshape(retrieval.shape), evicted


class BufferMachine(RuleBasedStateMachine):
    """Accesses, appends (the host tier and the cache grow) and evictions on both backends against the model."""

    @initialize(hkv=st.integers(1, 2), c=st.integers(1, 12), block=st.sampled_from([1, 3, 8]),
                fraction=st.sampled_from([0.0, 0.1, 0.3, 1.0]), seed=st.integers(0, 2**16))
    def setup(self, hkv, c, block, fraction, seed):
        self.rng = np.random.default_rng(seed)
        self.hkv, self.block, self.fraction = hkv, block, fraction
        self.meta = empty_meta(hkv, 3, 3)
        self.states = {m: m.empty_state(hkv, 3, 3, block) for m in (ref_wb, fast_wb)}
        self.model = LRUModel(hkv)
        self.add(c)

    def add(self, c):
        sizes = self.rng.integers(0, 20, c)
        # every head indexes the same tokens (concat_meta relies on it), in differently sized clusters
        sizes = np.stack([self.rng.permutation(sizes) for _ in range(self.hkv)])
        self.meta = concat_meta(self.meta, random_meta(self.rng, self.hkv, sizes, first_id=self.meta.keys.shape[1]))
        self.states = {m: m.sync_state(s, self.meta, self.fraction) for m, s in self.states.items()}
        self.model.blocks = -(-self.meta.sizes // self.block)
        self.model.capacity = max(self.model.capacity,
                                  math.ceil(self.fraction * self.model.blocks.sum(axis=1).max() - 1e-9))

    @property
    def n_clusters(self):
        return self.meta.sizes.shape[1]

    @rule(c=st.integers(1, 6))
    def append(self, c):
        self.add(c)

    def access(self, retrieval):
        sk = self.rng.standard_normal((self.hkv, 2, 3)).astype(np.float32)
        sids = np.array([-7, -8])
        hits, evicted = self.model.access(retrieval)
        bufs = {}
        for m, s in self.states.items():
            buf, res = m.gather_step(s, sk, -sk, sids, retrieval)
            assert np.array_equal(res.hit, hits), m.__name__
            assert [tuple(x) for x in res.evicted.tolist()] == evicted, m.__name__
            assert np.array_equal(res.admitted & res.hit, np.zeros_like(res.hit))
            bufs[m] = [(buf.keys[h, :buf.lengths[h]].copy(), buf.ids[h, :buf.lengths[h]].copy())
                       for h in range(self.hkv)]
        for h in range(self.hkv):                       # [steady | clusters in rank order], from either tier
            rows = np.concatenate([np.arange(self.meta.offsets[h, i], self.meta.offsets[h, i + 1])
                                   for i in retrieval[h]] + [np.zeros(0, np.int64)])
            for m in bufs:
                k, ids = bufs[m][h]
                assert np.array_equal(ids, np.concatenate([sids, self.meta.ids[h, rows]]))
                assert np.array_equal(k, np.concatenate([sk[h], self.meta.keys[h, rows]]))

    @rule(data=st.data())
    def access_any(self, data):
        r = data.draw(st.integers(0, self.n_clusters))
        self.access(np.array([data.draw(st.permutations(range(self.n_clusters)))[:r] for _ in range(self.hkv)],
                             np.int64).reshape(self.hkv, r))

    @rule(data=st.data())
    def access_hot(self, data):
        """A few clusters over and over: hits, and evictions of whatever else sits in the cache."""
        pool = range(min(4, self.n_clusters))
        r = data.draw(st.integers(1, len(pool)))
        self.access(np.array([data.draw(st.permutations(pool))[:r] for _ in range(self.hkv)], np.int64))

    @invariant()
    def capacity_lru_and_data(self):
        if not hasattr(self, "model"):
            return
        for m, s in self.states.items():
            cap = s.device.keys.shape[1]
            assert cap == self.model.capacity
            used = m.used_blocks(s)
            assert (used <= cap).all()
            for h in range(self.hkv):
                order = m.lru_order(s, h)
                assert order.tolist() == self.model.order[h]
                assert used[h] == self.model.blocks[h, order].sum()
                owned = s.table.block_of[h][s.table.block_of[h] >= 0]
                assert len(owned) == used[h] and len(set(owned.tolist())) == len(owned)   # no block shared
                for i in range(self.n_clusters):        # every cluster readable and unchanged
                    k, v, ids = m.read_cluster(s, h, i)
                    lo, hi = self.meta.offsets[h, i], self.meta.offsets[h, i + 1]
                    assert np.array_equal(k, self.meta.keys[h, lo:hi]) and np.array_equal(v, self.meta.values[h, lo:hi])
                    assert np.array_equal(ids, self.meta.ids[h, lo:hi])

    @rule()
    def same_device_blocks(self):
        """Fast == reference down to the device block ids."""
        a, b = (self.states[m].table.block_of for m in (ref_wb, fast_wb))
        assert np.array_equal(a, b)


BufferMachine.TestCase.settings = settings(stateful_step_count=25)
TestBufferMachine = BufferMachine.TestCase


@given(seed=st.integers(0, 2**16), fraction=st.sampled_from([0.05, 0.2, 0.5]), block=st.sampled_from([2, 8]))
def test_fast_equals_reference_on_a_decode(seed, fraction, block):
    """The same retrieval sequence from a real index: the same hits, misses, admissions and evictions."""
    k, v, q, n = drifting_decode(seed, steps=60)
    idx = WaveIndex.build(k[:, :n], v[:, :n], config=WaveConfig(**{**SMALL, "update_every": 16}), backend="fast")
    bufs = [rk.WaveBuffer(idx, fraction, block, backend=b) for b in ("reference", "fast")]
    for t in range(len(q)):
        idx.attend(q[t], buffer=bufs[1])
        fast_out = bufs[1].stats
        bufs[0].gather(idx.last_stats.retrieval_clusters)
        ref_out = bufs[0].stats
        for f in ("hits", "misses", "admitted", "evicted", "bytes_h2d", "cache_blocks_used", "cache_blocks"):
            assert getattr(ref_out, f) == getattr(fast_out, f), f
        for h in range(k.shape[0]):
            assert np.array_equal(bufs[0].cached_clusters(h), bufs[1].cached_clusters(h))
        idx.append(k[:, n + t], v[:, n + t])


# ---------------------------------------------------------------------------- validation


def test_validation():
    rng = np.random.default_rng(3)
    k, v = rng.standard_normal((2, 2, 100, 4)).astype(np.float32)
    cfg = WaveConfig(n_sink=2, n_local=8, tokens_per_cluster=4, min_index_tokens=0)
    idx = WaveIndex.build(k, v, config=cfg)
    with pytest.raises(TypeError, match="index"):
        rk.WaveBuffer("not an index")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="cache_fraction"):
            rk.WaveBuffer(idx, cache_fraction=bad)
    for bad in (True, "0.05", None):
        with pytest.raises(TypeError, match="cache_fraction"):
            rk.WaveBuffer(idx, cache_fraction=bad)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="block_size"):
            rk.WaveBuffer(idx, block_size=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="block_size"):
            rk.WaveBuffer(idx, block_size=bad)
    with pytest.raises(ValueError, match="backend"):
        rk.WaveBuffer(idx, backend="gpu")
    buf = rk.WaveBuffer(idx)
    c = idx.n_clusters
    for bad in (np.zeros((3, 1), np.int64), np.zeros(2, np.int64), np.zeros((2, 1), np.float32),
                np.full((2, 1), c), np.full((2, 1), -1), np.zeros((2, 2), np.int64)):
        with pytest.raises(ValueError, match="retrieval"):
            buf.gather(bad)
    with pytest.raises(ValueError, match="buffer"):
        WaveIndex.build(k, v, config=cfg).attend(rng.standard_normal((2, 4)).astype(np.float32), buffer=buf)
    with pytest.raises(ValueError):
        buf.read_cluster(0, c)
    assert "WaveBuffer(" in repr(buf) and "hit_ratio=n/a" in repr(buf)
    assert isinstance(rk.WaveBufferStats, type)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_read_cluster_takes_int_indices_only(backend):
    """``read_cluster(0, 1.5)`` passed the range check and failed inside NumPy indexing (issue 13)."""
    rng = np.random.default_rng(4)
    k, v = rng.standard_normal((2, 2, 100, 4)).astype(np.float32)
    idx = WaveIndex.build(k, v, config=WaveConfig(n_sink=2, n_local=8, tokens_per_cluster=4, min_index_tokens=0),
                          backend=backend)
    buf = rk.WaveBuffer(idx)
    for h, i, exc, name in ((0, 1.5, TypeError, "i"), (0, 1.0, TypeError, "i"), (0, True, TypeError, "i"),
                            (0.0, 1, TypeError, "h"), (np.bool_(False), 1, TypeError, "h"),
                            (2, 0, ValueError, "h"), (0, -1, ValueError, "i"), (0, idx.n_clusters, ValueError, "i")):
        with pytest.raises(exc, match=rf"^{name} must be an int in \["):
            buf.read_cluster(h, i)
    keys, values, ids = buf.read_cluster(np.int64(1), np.int32(2))
    meta = idx.meta
    assert len(ids) == meta.sizes[1, 2] and keys.shape == (len(ids), 4) and values.shape == (len(ids), 4)
