"""The wave buffer's device tier (fast/cuda/wave_buffer.py): the same decisions, buffers and cache contents as
the reference over a run of decode steps, including index appends that grow both tiers."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from cuda_helpers import upto
from retrokv.fast.cuda import wave_buffer as cu
from retrokv.reference import wave_buffer as ref
from retrokv.reference import wave_index as wi
from retrokv.reference.clustering import plan_clusters


def same_step(arrays, got, want, hkv):
    (bc, rc), (br, rr) = got, want
    for name, x, y in zip(rr._fields, rc, rr):
        assert np.array_equal(x, y), name                              # hits, admissions, evictions
    assert np.array_equal(bc.lengths, br.lengths)
    for x, y in zip(bc[:3], br[:3]):
        for h in range(hkv):
            assert np.array_equal(arrays.host(x)[h, :br.lengths[h]], y[h, :br.lengths[h]])


def same_cache(arrays, sc, sr):
    hkv, c = sr.host.sizes.shape
    for h in range(hkv):
        assert np.array_equal(cu.lru_order(sc, h), ref.lru_order(sr, h))
        for i in range(c):
            for x, y in zip(cu.read_cluster(sc, h, i), ref.read_cluster(sr, h, i)):
                assert np.array_equal(arrays.host(x), y)
    assert np.array_equal(cu.used_blocks(sc), ref.used_blocks(sr))


@st.composite
def runs(draw):
    hkv = draw(st.integers(1, 2))
    d, dv = draw(st.sampled_from([(4, 4), (3, 5)]))
    n = draw(st.integers(1, upto(80, 2000)))
    block = draw(st.sampled_from([1, 4, 16]))
    frac = draw(st.sampled_from([0.0, 0.1, 0.3, 1.0]))
    steps = draw(st.integers(1, 4))
    r = draw(st.integers(0, 4))
    grow = draw(st.booleans())                                         # an index update mid-run
    return hkv, d, dv, n, block, frac, steps, r, grow, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=15, deadline=None)
@given(runs())
def test_steps_match_reference(arrays, run):
    hkv, d, dv, n, block, frac, steps, r, grow, seed = run
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((hkv, 2 * n, d)).astype(np.float32)
    v = rng.standard_normal((hkv, 2 * n, dv)).astype(np.float32)
    c, seg = plan_clusters(n, 8, 40)
    meta = wi.build_meta_index(k[:, :n], v[:, :n], np.arange(n), c, seg, 2)
    sc = cu.sync_state(cu.empty_state(hkv, d, dv, block), meta, frac)
    sr = ref.sync_state(ref.empty_state(hkv, d, dv, block), meta, frac)
    steady = k[:, :2], v[:, :2], np.arange(2)
    for step in range(steps):
        if grow and step == steps // 2:                                # RetroInfer §4.2: clusters are appended
            more = wi.build_meta_index(k[:, n:], v[:, n:], np.arange(n, 2 * n), *plan_clusters(n, 8, 40), 2)
            meta = wi.concat_meta(meta, more)
            sc, sr = cu.sync_state(sc, meta, frac), ref.sync_state(sr, meta, frac)
        c = meta.sizes.shape[1]
        ret = np.stack([rng.choice(c, min(r, c), replace=False) for _ in range(hkv)]).astype(np.int64)
        got = cu.gather_step(sc, *(arrays.dev(x) for x in steady), arrays.dev(ret))
        same_step(arrays, got, ref.gather_step(sr, *steady, ret), hkv)
    same_cache(arrays, sc, sr)


def test_plan_fill_scatter_separately(arrays, rng):
    """The three steps called one by one (scatter reading the pinned host tier) leave the same cache."""
    k = rng.standard_normal((2, 60, 4)).astype(np.float32)
    meta = wi.build_meta_index(k, k, np.arange(60), 8, 1, 2)
    sc, sr = cu.sync_state(cu.empty_state(2, 4, 4, 4), meta, 0.25), ref.sync_state(ref.empty_state(2, 4, 4, 4), meta, 0.25)
    for ret in ([[0, 1, 2], [3, 4, 5]], [[2, 6, 7], [5, 0, 1]], [[0, 1, 2], [3, 4, 5]]):
        ret = np.array(ret, np.int64)
        res_c, res_r = cu.plan_step(sc, arrays.dev(ret)), ref.plan_step(sr, ret)
        assert np.array_equal(res_c.hit, res_r.hit) and np.array_equal(res_c.evicted, res_r.evicted)
        bc = cu.fill_execution_buffer(sc, arrays.dev(k[:, :0]), arrays.dev(k[:, :0]), np.arange(0), arrays.dev(ret), res_c.hit)
        br = ref.fill_execution_buffer(sr, k[:, :0], k[:, :0], np.arange(0), ret, res_r.hit)
        assert np.array_equal(arrays.host(bc.keys), br.keys)
        cu.scatter_admitted(sc, arrays.dev(ret), res_c.admitted)
        ref.scatter_admitted(sr, ret, res_r.admitted)
        same_cache(arrays, sc, sr)
