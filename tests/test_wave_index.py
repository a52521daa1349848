"""RetroInfer wave index: zones partition the tokens, the estimate is a lower bound, budget 100% is exact,
the estimation equals Eq. 2, fast == reference, real-model accuracy beats StreamingLLM."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import retrokv as rk
from retrokv.reference import wave_index as ref_wi
from retrokv.testing import invariants
from retrokv.wave_index import WaveConfig, WaveIndex

SMALL = dict(min_index_tokens=0, n_sink=2, n_local=5, tokens_per_cluster=4, segment_tokens=40, kmeans_iters=3,
             update_every=12, update_clusters=3)


@st.composite
def cases(draw):
    hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 7, 16]))
    n = draw(st.integers(0, 160))
    extra = draw(st.integers(0, 30))                       # generated tokens appended after the build
    r = draw(st.sampled_from([0.1, 0.5, 1.0, 1, 3]))      # floats: fractions; ints: fixed cluster counts
    e = draw(st.sampled_from([0.0, 0.3, 1.0, 2]))
    est = draw(st.booleans())
    group_rank = draw(st.sampled_from(ref_wi.GROUP_RANKS))
    radius_weight = draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))      # the ball bound (opt-in) a third of the time
    ball_share = draw(st.sampled_from([1.0, 0.5, 0.0])) if radius_weight else 1.0   # mixed with the plain ranking
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    k = (rng.standard_normal((hkv, n + extra, d)) + 1.0).astype(np.float32)
    v = rng.standard_normal((hkv, n + extra, d)).astype(np.float32)
    q = (rng.standard_normal((hkv * g, d)) * 1.5).astype(np.float32)
    budgets = {**({"retrieval_clusters": r} if isinstance(r, int) else {"retrieval_budget": r}),
               **({"estimation_clusters": e} if isinstance(e, int) else {"estimation_budget": e})}
    cfg = WaveConfig(**SMALL, **budgets, estimation=est, group_rank=group_rank, radius_weight=radius_weight,
                     ball_share=ball_share)
    return k, v, q, n, cfg


def grow(k, v, n, cfg, backend, bulk=False):
    idx = WaveIndex.build(k[:, :n], v[:, :n], config=cfg, backend=backend)
    if bulk and k.shape[1] > n:
        idx.append(k[:, n:], v[:, n:])
    for t in range(n, k.shape[1]) if not bulk else ():
        idx.append(k[:, t], v[:, t])
    return idx


@given(cases(), st.booleans())
def test_zones_partition_the_tokens(case, bulk):
    k, v, q, n, cfg = case
    idx = grow(k, v, n, cfg, "reference", bulk)
    idx.attend(q)
    # steady + retrieved tokens (exact_ids), estimated and dropped clusters' tokens: each token once per
    # KV head; the stats' token counts agree with the clusters; zones never share a cluster
    invariants.check_zones_partition(idx, k.shape[1])


@given(cases())
def test_estimate_is_a_lower_bound_per_cluster(case):
    """RetroInfer Eq. 3 on the built index: size * exp(q.C) <= sum_{k in cluster} exp(q.k) for every query head."""
    k, v, q, n, cfg = case
    idx = grow(k, v, n, cfg, "reference")
    invariants.check_jensen_lower_bound(q, idx.meta, scale=1.0, slack=np.log1p(1e-5))   # per KV head and query


@pytest.mark.parametrize("backend", ["reference", "fast"])
@given(case=cases())
def test_full_budget_is_full_attention(backend, case):
    k, v, q, n, cfg = case
    cfg = WaveConfig(**SMALL, retrieval_budget=1.0, group_rank=cfg.group_rank, radius_weight=cfg.radius_weight,
                     ball_share=cfg.ball_share)
    idxs = []

    def build(keys, values):
        idxs.append(grow(keys, values, n, cfg, backend))
        return idxs[-1]
    # out and lse within 4x the float32 reference's own error of the float64 oracle (retrokv.testing)
    invariants.check_full_budget_equals_full_attention(build, q, k, v)
    assert idxs[0].last_stats.density == (1.0 if k.shape[1] else 0.0)


@given(cases())
def test_merge_equals_equation_2(case):
    """The merged output is Eq. 2 written out in float64: exact exp-mass + size-weighted centroid mass."""
    k, v, q, n, cfg = case
    idx = grow(k, v, n, cfg, "reference")
    out = idx.attend(q)
    s, meta = idx.last_stats, idx.meta
    hkv, d = k.shape[0], k.shape[2]
    g = q.shape[0] // hkv
    for h in range(hkv):
        pos = s.exact_ids[h]
        est = [i for i in s.estimation_clusters[h] if meta.sizes[h, i] > 0]
        for r in range(g):
            qq = q[h * g + r].astype(np.float64) / np.sqrt(d)
            se = k[h, pos].astype(np.float64) @ qq
            sc = meta.centroids[h, est].astype(np.float64) @ qq
            m = max(se.max(initial=-np.inf), sc.max(initial=-np.inf))
            if m == -np.inf:
                assert not out[h * g + r].any()
                continue
            num = np.exp(se - m) @ v[h, pos] + np.exp(sc - m) @ meta.value_sums[h, est].astype(np.float64)
            den = np.exp(se - m).sum() + (meta.sizes[h, est] * np.exp(sc - m)).sum()
            np.testing.assert_allclose(out[h * g + r], num / den, atol=1e-5, rtol=1e-4)


@given(cases())
def test_estimation_is_attention_over_pseudo_tokens(case):
    k, v, q, n, cfg = case
    idx = grow(k, v, n, cfg, "reference")
    meta, scale = idx.meta, 1 / np.sqrt(k.shape[2])
    scores, rank = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale)
    _, est = ref_wi.select_zones(rank, idx.n_retrieve, idx.n_estimate)
    o1, l1 = ref_wi.estimate_partial(scores, meta.sizes, meta.value_sums, est)
    o2, l2 = ref_wi.estimation_as_pseudo_tokens(q, meta.centroids, meta.sizes, meta.value_sums, est, scale)
    np.testing.assert_allclose(o1, o2, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(l1, l2, atol=1e-5, rtol=1e-5)


@given(cases(), st.booleans())
def test_fast_equals_reference(case, bulk):
    k, v, q, n, cfg = case
    a, b = grow(k, v, n, cfg, "reference", bulk), grow(k, v, n, cfg, "fast", bulk)
    for name, x, y in zip(a.meta._fields, a.meta, b.meta):
        assert np.array_equal(x, y), name                   # same clusters, same layout
    oa, la = a.attend(q, return_lse=True)
    ob, lb = b.attend(q, return_lse=True)
    sa, sb = a.last_stats, b.last_stats
    assert np.array_equal(sa.retrieval_clusters, sb.retrieval_clusters)
    assert np.array_equal(sa.estimation_clusters, sb.estimation_clusters)
    assert all(np.array_equal(x, y) for x, y in zip(sa.exact_ids, sb.exact_ids))
    np.testing.assert_allclose(ob, oa, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lb, la, atol=2e-5, rtol=1e-5)


def test_short_input_is_exact_and_updates_grow_the_index(rng):
    cfg = WaveConfig(n_sink=4, n_local=64, update_every=32, update_clusters=4, min_index_tokens=0)
    k = rng.standard_normal((2, 200, 8)).astype(np.float32)
    v = rng.standard_normal((2, 200, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    idx = WaveIndex.build(k[:, :70], v[:, :70], config=cfg)               # 2 middle tokens < 16: no clusters
    assert idx.n_clusters == 0
    np.testing.assert_allclose(idx.attend(q), rk.full_attention(q, k[:, :70], v[:, :70]), atol=1e-6)
    added = sum(idx.append(k[:, t], v[:, t]) for t in range(70, 200))
    assert added == idx.n_clusters == 4 * ((200 - 4 - 64) // 32)   # an update per 32 tokens leaving the window
    assert idx.steady[0].shape[1] - 4 - 64 < 32
    assert WaveConfig().n_retrieve(8192) == 147 and WaveConfig().n_estimate(8192) == 1900
    assert WaveConfig().n_retrieve(8192 + 64) == 148 and WaveConfig().n_estimate(8192 + 64) == 1915  # +1, +15


def test_validation(rng):
    k = rng.standard_normal((2, 100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="retrieval_budget"):
        WaveConfig(retrieval_budget=1.5)
    with pytest.raises(ValueError, match="n_local"):
        WaveConfig(n_local=-1)
    with pytest.raises(TypeError, match="estimation_budget"):
        WaveConfig(estimation_budget=True)
    with pytest.raises(ValueError, match=r"group_rank must be one of \('softmax_sum', 'max_logit'\), got 'mean'"):
        WaveConfig(group_rank="mean")
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="radius_weight must be a finite float >= 0"):
            WaveConfig(radius_weight=bad)
    with pytest.raises(TypeError, match="radius_weight"):
        WaveConfig(radius_weight="0.5")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ball_share must be a float in"):
            WaveConfig(radius_weight=0.5, ball_share=bad)
    with pytest.raises(ValueError, match="ball_share=0.5 shares the retrieval zone .* needs radius_weight > 0"):
        WaveConfig(ball_share=0.5)
    c = np.zeros((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match="n_plain=1 mixes .* needs radius_weight > 0"):
        ref_wi.rank_clusters(np.ones((1, 2), np.float32), c, np.ones((1, 3), np.int64), 1.0, n_plain=1)
    with pytest.raises(ValueError, match="n_plain must be an int >= 0"):
        ref_wi.rank_clusters(np.ones((1, 2), np.float32), c, np.ones((1, 3), np.int64), 1.0, n_plain=-1)
    with pytest.raises(TypeError, match="config"):
        WaveIndex.build(k, k, config={"n_sink": 4})
    with pytest.raises(ValueError, match="keys"):
        WaveIndex.build(k[0], k[0])
    with pytest.raises(ValueError, match="agree"):
        WaveIndex.build(k, k[:, :50])
    with pytest.raises(TypeError, match="keys"):
        WaveIndex.build(k.astype(np.int32), k)
    with pytest.raises(ValueError, match="backend"):
        WaveIndex.build(k, k, backend="gpu")
    idx = WaveIndex.build(k, k)
    with pytest.raises(ValueError, match=r"q must have shape \(Hq, 8\)"):
        idx.attend(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        idx.attend(np.full((2, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="append expects k of shape"):
        idx.append(np.zeros((3, 8), np.float32), np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="buffer"):
        idx.attend(np.zeros((2, 8), np.float32), buffer=object())


@pytest.mark.model
def test_real_model_beats_streaming_llm_and_estimation_helps(captured):
    """SmolLM2, 1024-token prompt: decode queries of the last 16 positions, a few layers (indexed although
    below the default build threshold: ``min_index_tokens=0``)."""
    errs = {"wave": [], "noest": [], "stream": []}
    recall = {0.018: [], 0.1: []}
    for layer in (2, 10, 20):
        c = captured[layer]
        for t in range(c.q.shape[1] - 16, c.q.shape[1], 4):
            k, v, q = c.k[:, :t + 1], c.v[:, :t + 1], c.q[:, t]
            full = rk.full_attention(q, k, v)
            scores = np.einsum("hgd,hnd->hgn", q.reshape(k.shape[0], -1, q.shape[1]), k)    # (Hkv, G, N)
            for budget in recall:
                idx = WaveIndex.build(k, v, config=WaveConfig(retrieval_budget=budget, min_index_tokens=0),
                                      backend="reference")
                out = idx.attend(q)
                hits = [np.isin(np.argsort(-scores[h], axis=1)[:, :32], idx.last_stats.exact_ids[h]).mean()
                        for h in range(k.shape[0])]
                recall[budget].append(np.mean(hits))
                if budget == 0.018:
                    errs["wave"].append(np.linalg.norm(out - full) / np.linalg.norm(full))
                    n_exact = len(idx.last_stats.exact_ids[0])
                    idx_ne = WaveIndex.build(k, v, config=WaveConfig(estimation=False, min_index_tokens=0),
                                        backend="reference")
                    errs["noest"].append(np.linalg.norm(idx_ne.attend(q) - full) / np.linalg.norm(full))
                    keep = np.r_[0:4, t + 1 - (n_exact - 4):t + 1]   # StreamingLLM with the same exact budget
                    o_s = rk.full_attention(q, k[:, keep], v[:, keep])
                    errs["stream"].append(np.linalg.norm(o_s - full) / np.linalg.norm(full))
    med = {k: float(np.median(x)) for k, x in errs.items()}
    print(med, {b: float(np.mean(r)) for b, r in recall.items()})
    assert med["wave"] < med["stream"], med
    assert med["wave"] < med["noest"], med
    assert np.mean(recall[0.1]) > np.mean(recall[0.018]), recall


def test_fast_attend_on_two_indexes_from_two_threads_is_exact(rng):
    """Each index owns its execution-buffer workspace: threads on different indexes never share one
    (a module-level workspace gave 143 wrong results of 300 here)."""
    import threading

    cfg = WaveConfig(n_sink=2, n_local=4, tokens_per_cluster=4, segment_tokens=64, retrieval_budget=1.0,
                     min_index_tokens=0)
    idx, want, qs = [], [], []
    for n in (300, 700):                            # different sizes: different buffer widths
        k = rng.standard_normal((2, n, 16)).astype(np.float32)
        v = rng.standard_normal((2, n, 16)).astype(np.float32)
        q = rng.standard_normal((30, 4, 16)).astype(np.float32)
        idx.append(WaveIndex.build(k, v, config=cfg, backend="fast"))
        assert idx[-1].n_clusters > 0                  # the retrieval path (and its workspace) is exercised
        qs.append(q)
        want.append([idx[-1].attend(q[t]) for t in range(len(q))])
    wrong = []

    def run(i):
        for _ in range(5):
            for t in range(len(qs[i])):
                if not np.array_equal(idx[i].attend(qs[i][t]), want[i][t]):
                    wrong.append((i, t))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not wrong


def test_public_gather_results_are_the_callers_own(rng):
    """gather_execution_buffer without a workspace returns fresh arrays: a later call cannot overwrite them."""
    from retrokv.fast import wave_index as F

    cfg = WaveConfig(n_sink=2, n_local=4, tokens_per_cluster=4, segment_tokens=64, min_index_tokens=0)
    k = rng.standard_normal((2, 200, 8)).astype(np.float32)
    idx = WaveIndex.build(k, k, config=cfg, backend="fast")
    sk, sv, sids = idx.steady
    r1 = np.array([[0, 1], [2, 3]])
    first = F.gather_execution_buffer(idx.meta, sk, sv, sids, r1)
    keep = first.keys.copy()
    F.gather_execution_buffer(idx.meta, sk, sv, sids, np.array([[4, 5], [6, 7]]))
    np.testing.assert_array_equal(first.keys, keep)


# ---- issue 13: an int budget was a count (1 = one cluster) while 1.0 was every cluster ------------------

@pytest.mark.parametrize("name,count", [("retrieval_budget", "retrieval_clusters"),
                                        ("estimation_budget", "estimation_clusters")])
@pytest.mark.parametrize("value", [0, 1, 2, np.int64(1)])
def test_int_budget_is_refused_and_points_to_the_count_field(name, count, value):
    with pytest.raises(TypeError, match=rf"{name} is a fraction.*use {count}={value}"):
        WaveConfig(**{name: value})


def test_fractions_and_counts_are_separate_fields():
    """``retrieval_budget=1.0`` is every cluster; ``retrieval_clusters=1`` is one; a count overrides the fraction."""
    assert WaveConfig(retrieval_budget=1.0).n_retrieve(50) == 50
    assert WaveConfig(retrieval_clusters=1).n_retrieve(50) == 1
    assert WaveConfig(retrieval_budget=0.5, retrieval_clusters=3).n_retrieve(50) == 3
    assert WaveConfig(retrieval_clusters=80).n_retrieve(50) == 50                 # capped at what exists
    cfg = WaveConfig(retrieval_clusters=2, estimation_clusters=np.int64(5))
    assert (cfg.n_retrieve(50), cfg.n_estimate(50), cfg.n_estimate(6)) == (2, 5, 4)
    assert type(cfg.estimation_clusters) is int
    assert WaveConfig(retrieval_budget=np.float32(0.5)).n_retrieve(10) == 5       # NumPy floats are fractions
    assert WaveConfig(estimation=False, estimation_clusters=4).n_estimate(50) == 0
    for bad, exc in ((dict(retrieval_clusters=-1), ValueError), (dict(retrieval_clusters=1.0), TypeError),
                     (dict(estimation_clusters=True), TypeError), (dict(retrieval_budget=float("nan")), ValueError),
                     (dict(scale=True), TypeError)):
        with pytest.raises(exc, match=next(iter(bad))):
            WaveConfig(**bad)


def test_count_fields_drive_the_index(rng):
    """An index built with ``retrieval_clusters=n`` retrieves n clusters per head (the old ``retrieval_budget=n``)."""
    k = rng.standard_normal((2, 300, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    idx = WaveIndex.build(k, k, config=WaveConfig(**SMALL, retrieval_clusters=3, estimation_clusters=2))
    idx.attend(q)
    assert idx.last_stats.retrieval_clusters.shape == (2, 3) and idx.last_stats.estimation_clusters.shape == (2, 2)
    every = WaveIndex.build(k, k, config=WaveConfig(**SMALL, retrieval_budget=1.0))
    np.testing.assert_allclose(every.attend(q), rk.full_attention(q, k, k), atol=1e-5)


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([2, 16]), st.lists(st.integers(0, 70), min_size=3,
       max_size=3), st.integers(0, 2**31 - 1), st.booleans())
def test_fast_execution_buffer_attention_equals_per_head_reference(hkv, g, d, lens, seed, nan):
    """The fused kernel (every head in one call, ragged lengths, a view into a wider workspace)
    equals the reference's per-head partial attention; an empty head gives the merge identity and a
    NaN query row gives NaN on both."""
    from retrokv.fast import wave_index as fast_wi

    rng = np.random.default_rng(seed)
    lengths = np.array(lens[:hkv], dtype=np.int64)
    wide = 80                                                   # the workspace is wider than any head
    k = rng.standard_normal((hkv, wide, d)).astype(np.float32) * 2
    v = rng.standard_normal((hkv, wide, d + 1)).astype(np.float32)
    q = rng.standard_normal((hkv * g, d)).astype(np.float32)
    if nan:
        q[0, 0] = np.nan
    width = int(lengths.max())
    buf = ref_wi.ExecBuffer(k[:, :width], v[:, :width], np.zeros((hkv, width), np.int64), lengths)
    want, want_lse = ref_wi.attend_execution_buffer(q, buf, 0.3)
    got, got_lse = fast_wi.attend_execution_buffer(q, buf, 0.3)
    assert got.shape == want.shape == (hkv * g, d + 1) and got_lse.shape == (hkv * g,)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got_lse, want_lse, atol=2e-5, rtol=1e-5)
    for h in np.flatnonzero(lengths == 0):
        rows = slice(h * g, (h + 1) * g)
        assert np.all(got[rows] == 0) and np.all(np.isneginf(got_lse[rows])) or (nan and h == 0)
    if nan and lengths[0] > 0:
        assert np.isnan(got[0]).all() and np.isnan(want[0]).all()


def test_small_decode_steps_run_on_one_thread_and_restore_the_count():
    """threads_for: below the work threshold the kernels inside see one Numba thread; the caller's
    count is back afterwards, also after an exception."""
    import numba as nb

    from retrokv.fast._dispatch import PARALLEL_MIN_WORK, threads_for

    before = nb.get_num_threads()
    with threads_for(PARALLEL_MIN_WORK - 1):
        assert nb.get_num_threads() == 1
    with threads_for(PARALLEL_MIN_WORK):
        assert nb.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with threads_for(0):
            raise RuntimeError("boom")
    assert nb.get_num_threads() == before


@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 90), st.integers(0, 6), st.integers(0, 12),
       st.integers(0, 2**31 - 1), st.booleans())
def test_fast_in_place_exact_zone_equals_gather_then_attend(hkv, g, m, n_steady, r, seed, nan):
    """attend_retrieved (fast: reads the clusters where they lie) equals the reference's copy into the
    execution buffer followed by its attention: same outputs, same token ids in the same order, for
    any retrieval (empty, all clusters, repeated sizes) and a NaN query row."""
    from retrokv.fast import wave_index as fast_wi

    rng = np.random.default_rng(seed)
    d, dv = 8, 5
    k = rng.standard_normal((hkv, m + n_steady, d)).astype(np.float32)
    v = rng.standard_normal((hkv, m + n_steady, dv)).astype(np.float32)
    n_clusters = min(m, 7)
    meta = ref_wi.build_meta_index(k[:, :m], v[:, :m], np.arange(m), n_clusters, 1, 2)
    c = meta.centroids.shape[1]
    retrieval = np.stack([rng.permutation(c)[:min(r, c)] for _ in range(hkv)]).astype(np.int64)
    sk, sv = k[:, m:].copy(), v[:, m:].copy()
    sids = np.arange(m, m + n_steady)
    q = rng.standard_normal((hkv * g, d)).astype(np.float32)
    if nan:
        q[-1, 0] = np.nan
    want = ref_wi.attend_retrieved(q, meta, sk, sv, sids, retrieval, 0.4)
    got = fast_wi.attend_retrieved(q, meta, sk, sv, sids, retrieval, 0.4)
    np.testing.assert_allclose(got[0], want[0], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=2e-5, rtol=1e-5)
    assert len(got[2]) == hkv and all(np.array_equal(a, b) for a, b in zip(got[2], want[2]))
    for h in range(hkv):                                      # exactly the steady ids + the retrieved clusters'
        assert len(got[2][h]) == n_steady + int(meta.sizes[h, retrieval[h]].sum())


@given(st.integers(1, 3), st.integers(0, 60), st.integers(0, 20), st.integers(0, 40), st.integers(0, 2**31 - 1),
       st.sampled_from(["distinct", "ties", "nan"]))
def test_fast_zone_selection_equals_the_stable_sort(hkv, c, r, e, seed, kind):
    """The partition-based selection gives the reference's zones exactly: best first, ties to the
    lower cluster id (many equal ranks), every budget from none to more than all clusters."""
    from retrokv.fast import wave_index as fast_wi

    rng = np.random.default_rng(seed)
    rank = rng.random((hkv, c)).astype(np.float32)
    if kind == "ties":
        rank = rng.integers(0, 3, (hkv, c)).astype(np.float32)
    if kind == "nan" and c:
        rank[0, rng.integers(0, c)] = np.nan
    want = ref_wi.select_zones(rank, r, e)
    got = fast_wi.select_zones(rank, r, e)
    if kind == "nan":                                          # NaN ranks: same zone sizes, no id twice
        assert [x.shape for x in got] == [x.shape for x in want]
        both = np.concatenate(got, axis=1)
        assert all(len(set(row)) == len(row) for row in both)
        return
    for a, b in zip(got, want):
        assert a.dtype == np.int64 and np.array_equal(a, b)


@given(cases(), st.sampled_from(["finite", "nan_q"]))
def test_fused_small_step_equals_the_composed_kernels(case, kind):
    """A fast step runs the driver as one kernel (``_decode_step``) when it is small or has more KV heads
    than threads; forcing the composed path must give the same zones and the same bits, NaN inputs
    included."""
    from retrokv.fast import wave_index as fast_wi

    k, v, q, n, cfg = case
    if kind == "nan_q":                                        # NaN ranks: the fused kernel declines
        q = q.copy()
        q[0, 0] = np.nan
    idx = grow(k, v, n, cfg, "fast")
    fused = idx.attend(q, return_lse=True, check_finite=False), idx.last_stats
    old = fast_wi._fused
    fast_wi._fused = lambda work, hkv: False
    try:
        composed = idx.attend(q, return_lse=True, check_finite=False), idx.last_stats
    finally:
        fast_wi._fused = old
    (fo, fl), fs = fused
    (co, cl), cs = composed
    assert np.array_equal(fs.retrieval_clusters, cs.retrieval_clusters)
    assert np.array_equal(fs.estimation_clusters, cs.estimation_clusters)
    assert all(np.array_equal(x, y) for x, y in zip(fs.exact_ids, cs.exact_ids))
    assert np.array_equal(fo, co, equal_nan=True) and np.array_equal(fl, cl, equal_nan=True)   # the same bits
    scale, meta = 1.0 / np.sqrt(q.shape[1]), idx._meta
    fused_ran = fast_wi._fused_step(q, meta, idx._sk, idx._sv, idx._sids, idx.n_retrieve, idx.n_estimate,
                                    scale, cfg.group_rank) is not None
    nan_rank = bool(np.isnan(fast_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, cfg.group_rank)[1]).any())
    assert fused_ran != nan_rank                               # the fused kernel ran, or declined on a NaN rank


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=80), st.data())
def test_radix_select_gives_the_kth_smallest(values, data):
    """The fast selection's radix select returns the k-th smallest float: negatives, +-0, subnormals,
    infinities and ties included (the cut the zone selection fills ties around)."""
    from retrokv.fast._zone_select import _kth_smallest

    x = np.array(values, dtype=np.float32)
    k = data.draw(st.integers(1, len(x)))
    assert _kth_smallest(x, k) == np.sort(x)[k - 1]


def test_fast_zone_selection_of_float64_ranks_is_the_reference(rng):
    """The radix select reads float32 bits: other dtypes take the reference's sort, with the same zones."""
    from retrokv.fast import wave_index as fast_wi

    rank = rng.random((2, 50))
    rank[:, ::7] = 0.25                                        # ties as well
    for a, b in zip(fast_wi.select_zones(rank, 3, 10), ref_wi.select_zones(rank, 3, 10)):
        assert np.array_equal(a, b)


def test_metadata_moves_to_one_huge_page_block_with_the_same_values():
    """fast ``_on_huge_pages``: above a huge page of small arrays they become C-contiguous views of one
    2 MiB-aligned block with the same values (the sorted KV stays where it is); below, nothing moves;
    an index update (``concat_meta``) packs again."""
    from retrokv.fast import _wave_build as fast_build

    rng = np.random.default_rng(0)
    hkv, c, d, m = 2, 2500, 64, 40000
    meta = ref_wi.MetaIndex(rng.standard_normal((hkv, c, d)).astype(np.float32),
                            rng.standard_normal((hkv, c, d)).astype(np.float32),
                            rng.integers(0, 30, (hkv, c)), np.sort(rng.integers(0, m, (hkv, c + 1)), axis=1),
                            np.zeros((hkv, m, d), np.float32), np.zeros((hkv, m, d), np.float32),
                            rng.integers(0, m, (hkv, m)))
    packed = fast_build._on_huge_pages(meta)
    small = ("centroids", "value_sums", "sizes", "offsets", "ids")
    for f in small:
        a, b = getattr(meta, f), getattr(packed, f)
        assert b is not a and b.dtype == a.dtype and b.flags.c_contiguous and np.array_equal(a, b)
    assert packed.keys is meta.keys and packed.values is meta.values
    base = packed.centroids.base
    assert all(np.shares_memory(getattr(packed, f), base) for f in small)
    assert packed.centroids.ctypes.data % fast_build._HUGE_PAGE == 0 and base.nbytes >= 4 << 20
    tiny = meta._replace(centroids=meta.centroids[:, :10], value_sums=meta.value_sums[:, :10], sizes=meta.sizes[:, :10],
                         offsets=meta.offsets[:, :11], ids=meta.ids[:, :100])
    assert fast_build._on_huge_pages(tiny) is tiny
    grown = fast_build.concat_meta(packed, packed)
    assert grown.centroids.shape == (hkv, 2 * c, d) and grown.centroids.ctypes.data % fast_build._HUGE_PAGE == 0


@given(cases(), st.sampled_from(["finite", "nan_q", "nan_all"]))
def test_fast_rank_clusters_equals_reference(case, kind):
    """The fast ranking (vectorised softmax, fast/_softmax.py) against the reference's: scores to float32
    rounding, ranks within a few ulps of a softmax sum, and NaN exactly where the reference has it (a query
    head with a NaN makes its group's ranks NaN; the vectorised max alone could skip the NaN)."""
    from retrokv.fast import wave_index as fast_wi

    k, v, q, n, cfg = case
    idx = WaveIndex.build(k[:, :n], v[:, :n], config=cfg, backend="fast")
    meta = idx.meta
    q = q.copy()
    if kind == "nan_q":
        q[0, 0] = np.nan
    elif kind == "nan_all":
        q[0] = np.nan
    scale = 1.0 / np.sqrt(q.shape[1])
    radii = ref_wi.cluster_radii(meta)
    n_plain = cfg.n_plain(meta.centroids.shape[1])
    fs, fr = fast_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, cfg.group_rank, radii, cfg.radius_weight,
                                   n_plain)
    rs, rr = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, cfg.group_rank, radii, cfg.radius_weight,
                                  n_plain)
    assert np.array_equal(np.isnan(fr), np.isnan(rr))
    assert np.allclose(fs, rs, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert np.allclose(fr, rr, rtol=1e-5, atol=1e-6 if cfg.group_rank == "softmax_sum" else 1e-5, equal_nan=True)
    if kind != "finite" and meta.centroids.shape[1]:
        # a NaN query row: its group's softmaxes are NaN for every cluster; its max is NaN for every cluster
        # with keys (an empty cluster stays -inf: masked before the max), unless the ball bound adds NaN |q| to it
        every = cfg.group_rank == "softmax_sum" or cfg.radius_weight
        nan_where = np.ones_like(fr[0], bool) if every else meta.sizes[0] > 0
        assert np.array_equal(np.isnan(fr[0]) | np.isposinf(fr[0]), nan_where)   # +inf: the plain share leads
    if cfg.group_rank == "max_logit" and not cfg.radius_weight:   # the definition: each cluster's best score
        assert np.array_equal(rr, rs.max(axis=1), equal_nan=True)
    if cfg.radius_weight:                                      # the returned scores stay the centroid scores
        assert np.array_equal(rs, ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale)[0], equal_nan=True)
    if n_plain:           # the plain ranking's best n_plain lead (+inf); every other cluster keeps its ball rank
        plain = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, cfg.group_rank)[1]
        lead = ref_wi.select_zones(plain, n_plain, 0)[0]
        ball = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, cfg.group_rank, radii, cfg.radius_weight)[1]
        first = np.zeros_like(rr, bool)
        np.put_along_axis(first, lead, True, axis=1)
        assert np.all(rr[first] == np.inf) and np.array_equal(rr[~first], ball[~first], equal_nan=True)


def test_max_logit_ranking_keeps_a_sharp_heads_cluster_that_the_softmax_sum_outvotes():
    """The case ``group_rank="max_logit"`` exists for (docs/frontier.md, "Why the wave index misses needles"):
    query head 0 scores cluster 0 highest (4.0) but spreads its softmax over 30 near clusters (3.5), so the
    cluster holds only 5% of that head's mass; heads 1 and 2 are lukewarm (2.0) on ten other clusters, 6% of
    each one's mass. RetroInfer's sum retrieves one of the ten; the best-score ranking retrieves cluster 0."""
    c = 60
    scores = np.zeros((3, c), np.float32)
    scores[0, 0], scores[0, 1:31] = 4.0, 3.5
    scores[1:, 40:50] = 2.0
    centroids = np.eye(c, dtype=np.float32)[None]          # one-hot centroids: q . C_i is scores[:, i]
    sizes = np.full((1, c), 16)
    _, soft = ref_wi.rank_clusters(scores, centroids, sizes, 1.0, "softmax_sum")
    _, best = ref_wi.rank_clusters(scores, centroids, sizes, 1.0, "max_logit")
    assert ref_wi.select_zones(soft, 1, 0)[0][0, 0] in range(40, 50)
    assert ref_wi.select_zones(best, 1, 0)[0][0, 0] == 0
    assert np.argsort(-soft[0], kind="stable").tolist().index(0) == 10     # behind all ten lukewarm clusters
    sizes[0, 0] = 0                                          # an empty cluster never ranks, under either ranking
    for gr in ref_wi.GROUP_RANKS:
        assert ref_wi.select_zones(ref_wi.rank_clusters(scores, centroids, sizes, 1.0, gr)[1], c - 1, 0)[0][0, -1] != 0


def test_one_query_head_per_group_ranks_the_same_under_both_rankings(rng):
    """With G = 1 the softmax is monotone in the score, so both rankings give the same zones."""
    k = (rng.standard_normal((2, 900, 16)) + 0.5).astype(np.float32)
    v = rng.standard_normal((2, 900, 16)).astype(np.float32)
    q = rng.standard_normal((2, 16)).astype(np.float32) * 2
    zones = []
    for gr in ref_wi.GROUP_RANKS:
        idx = WaveIndex.build(k, v, config=WaveConfig(**SMALL, retrieval_budget=0.05, group_rank=gr), backend="fast")
        idx.attend(q)
        zones.append((idx.last_stats.retrieval_clusters, idx.last_stats.estimation_clusters))
    assert zones[0][0].shape[1] > 1
    assert all(np.array_equal(a, b) for a, b in zip(*zones))


@given(cases())
def test_cluster_radii_and_the_ball_bound(case):
    """Each radius is its cluster's largest key-to-centroid distance (0 when empty), and with weight 1 the ball
    bound is an upper bound on every key score of the cluster, for every query head (Cauchy-Schwarz)."""
    k, v, q, n, cfg = case
    meta = WaveIndex.build(k[:, :n], v[:, :n], config=cfg, backend="reference").meta
    radii = ref_wi.cluster_radii(meta)
    hkv, c, _ = meta.centroids.shape
    g, scale = q.shape[0] // hkv, 0.25
    scores, _ = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale)
    qn = np.linalg.norm(q, axis=1).reshape(hkv, g)
    for h in range(hkv):
        for i in range(c):
            rows = meta.keys[h, meta.offsets[h, i]:meta.offsets[h, i + 1]]
            want = np.linalg.norm(rows - meta.centroids[h, i], axis=1).max() if len(rows) else 0.0
            assert radii[h, i] == pytest.approx(want, rel=1e-5, abs=1e-6)
            if len(rows):
                best = (rows @ q[h * g:(h + 1) * g].T).max(axis=0) * scale           # (G,) best key score per head
                assert np.all(scores[h, :, i] + qn[h] * radii[h, i] * scale >= best - 1e-4)


def test_ball_bound_ranks_a_spread_cluster_with_one_sharp_key_first(rng):
    """Two clusters with the same centroid score for q: a tight one, and a spread one holding the key q points
    at. The centroid ties them (the lower id wins); the ball bound retrieves the spread one."""
    d = 4
    tight = np.zeros((8, d), np.float32)
    tight[:, 1] = 1.0                                                   # centroid (0, 1, 0, 0), radius 0
    spread = np.zeros((8, d), np.float32)
    spread[:, 1] = 1.0
    spread[0, 0], spread[1:, 0] = 7.0, -1.0                             # centroid (0, 1, 0, 0), one key far out
    keys = np.concatenate([tight, spread])[None]
    meta = ref_wi.MetaIndex(np.array([[[0, 1, 0, 0], [0, 1, 0, 0]]], np.float32), np.zeros((1, 2, d), np.float32),
                            np.array([[8, 8]]), np.array([[0, 8, 16]]), keys, np.zeros_like(keys),
                            np.arange(16)[None])
    q = np.array([[1.0, 1.0, 0, 0]], np.float32)
    radii = ref_wi.cluster_radii(meta)
    assert radii[0, 0] == 0 and radii[0, 1] == pytest.approx(np.linalg.norm(spread[0] - [0, 1, 0, 0]))
    for gr in ref_wi.GROUP_RANKS:
        plain = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, 1.0, gr)[1]
        ball = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, 1.0, gr, radii, 0.5)[1]
        assert ref_wi.select_zones(plain, 1, 0)[0][0, 0] == 0 and ref_wi.select_zones(ball, 1, 0)[0][0, 0] == 1


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("group_rank", ref_wi.GROUP_RANKS)
def test_mixed_ranking_retrieves_the_plain_best_then_the_ball_best(rng, backend, group_rank):
    """``ball_share``: of R retrieved clusters, the plain ranking's best ``floor((1 - share) R)``, then the ball
    bound's best of the rest; the estimation zone continues in ball-bound order. Share 1 is the ball bound's
    zones, share 0 retrieves the plain ranking's best R."""
    hkv, g, d, n = 2, 3, 16, 900
    k = (rng.standard_normal((hkv, n, d)) * rng.uniform(0.3, 2.0, (hkv, n, 1)) + 0.5).astype(np.float32)
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    q = (rng.standard_normal((hkv * g, d)) * 2).astype(np.float32)
    r, e = 9, 12

    def zones(**kw):
        cfg = WaveConfig(**SMALL, retrieval_clusters=r, estimation_clusters=e, group_rank=group_rank, **kw)
        idx = WaveIndex.build(k, v, config=cfg, backend=backend)
        idx.attend(q)
        return idx, idx.last_stats.retrieval_clusters, idx.last_stats.estimation_clusters

    idx, ret, est = zones(radius_weight=0.5, ball_share=0.5)
    meta, scale = idx.meta, 1.0 / np.sqrt(d)
    radii = ref_wi.cluster_radii(meta)
    plain = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, group_rank)[1]
    ball = ref_wi.rank_clusters(q, meta.centroids, meta.sizes, scale, group_rank, radii, 0.5)[1]
    n_plain = idx.config.n_plain(idx.n_clusters)
    assert n_plain == 4                                         # floor(0.5 * 9)
    for h in range(hkv):
        lead = np.argsort(-plain[h], kind="stable")[:n_plain]
        rest = [i for i in np.argsort(-ball[h], kind="stable") if i not in set(lead)]
        assert set(ret[h]) == set(lead) | set(rest[:r - n_plain])
        assert set(est[h]) == set(rest[r - n_plain:r - n_plain + e])
    pure = zones(radius_weight=0.5)
    assert all(np.array_equal(np.sort(a, axis=1), np.sort(b, axis=1)) for a, b in zip(pure[1:], zones(
        radius_weight=0.5, ball_share=1.0)[1:]))
    _, ret0, _ = zones(radius_weight=0.5, ball_share=0.0)
    for h in range(hkv):
        assert set(ret0[h]) == set(np.argsort(-plain[h], kind="stable")[:r])
    assert not all(set(a) == set(b) for a, b in zip(ret, pure[1]))    # the mix changed some head's zone
