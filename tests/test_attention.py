"""Attention core: reference vs a float64 oracle, fast vs reference, and the LSE merge's algebra."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import retrokv as rk
from retrokv.testing import assert_attention_close
from retrokv.testing.oracles import attention_oracle as oracle   # float64 attention, written the plain way

BACKENDS = ["reference", "fast"]


@st.composite
def qkv(draw, allow_empty=True):
    hkv = draw(st.integers(1, 3))
    g = draw(st.integers(1, 4))
    d = draw(st.sampled_from([1, 3, 8, 17, 64]))
    n = draw(st.integers(0 if allow_empty else 1, 70))
    t = draw(st.one_of(st.none(), st.integers(1, max(1, min(n, 9)))))
    causal = draw(st.booleans())
    mag = draw(st.sampled_from([0.1, 1.0, 4.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    qshape = (hkv * g, d) if t is None else (hkv * g, t, d)
    q = (rng.standard_normal(qshape) * mag).astype(np.float32)
    k = (rng.standard_normal((hkv, n, d)) * mag).astype(np.float32)
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    if t is not None and n < t:
        causal = False
    return q, k, v, causal


@given(qkv())
def test_reference_matches_float64_oracle(case):
    q, k, v, causal = case
    out, lse = rk.partial_attention(q, k, v, causal=causal, backend="reference")
    o64, l64 = oracle(q, k, v, causal)
    assert out.dtype == np.float32 and out.shape == o64.shape and lse.shape == l64.shape
    np.testing.assert_allclose(out, o64, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, l64, atol=2e-5, rtol=1e-5)


@given(qkv())
def test_fast_error_is_a_small_multiple_of_reference_error(case):
    """FlashAttention-style tolerance (retrokv.testing): fast's error vs float64 is at most 4x the reference's
    own, + a floor of one float32 ulp of max|v| and of what float32 rounding of the scores can cause (the
    reference can round a large score luckily; a fixed 4-ulp floor failed on scores ~50)."""
    q, k, v, causal = case
    fast_o, fast_l = rk.partial_attention(q, k, v, causal=causal, backend="fast")
    assert_attention_close(fast_o, q, k, v, causal=causal, lse=fast_l, atol_factor=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_keys_give_zero_output_and_minus_inf_lse(backend):
    q = np.ones((4, 8), np.float32)
    k = np.zeros((2, 0, 8), np.float32)
    out, lse = rk.partial_attention(q, k, k, backend=backend)
    assert out.shape == (4, 8) and not out.any() and np.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_block_last_query_equals_decode(backend, rng):
    """The last query of a causal block sees every key, like a decode query; the first sees N - T + 1 keys."""
    q = rng.standard_normal((6, 5, 16)).astype(np.float32)
    k = rng.standard_normal((3, 12, 16)).astype(np.float32)
    v = rng.standard_normal((3, 12, 16)).astype(np.float32)
    block = rk.full_attention(q, k, v, causal=True, backend=backend)
    np.testing.assert_allclose(block[:, -1], rk.full_attention(q[:, -1], k, v, backend=backend), atol=1e-6)
    np.testing.assert_allclose(block[:, 0], rk.full_attention(q[:, 0], k[:, :8], v[:, :8], backend=backend), atol=1e-6)


@given(qkv(allow_empty=False), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_any_partition_of_keys_merges_to_full_attention(case, n_parts, seed):
    q, k, v, _ = case
    q = q if q.ndim == 2 else q[:, 0]
    n = k.shape[1]
    labels = np.random.default_rng(seed).integers(0, n_parts, n)   # some parts may be empty
    for backend in BACKENDS:
        parts = [rk.partial_attention(q, k[:, labels == p], v[:, labels == p], backend=backend) for p in range(n_parts)]
        out, lse = rk.merge_partials(parts, backend=backend)
        full, full_lse = rk.partial_attention(q, k, v, backend=backend)
        np.testing.assert_allclose(out, full, atol=3e-6, rtol=1e-5)
        np.testing.assert_allclose(lse, full_lse, atol=3e-6, rtol=1e-6)


@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_merge_is_associative_and_order_independent(n_parts, seed):
    rng = np.random.default_rng(seed)
    parts = [(rng.standard_normal((3, 4)).astype(np.float32),
              np.where(rng.random(3) < 0.2, -np.inf, rng.standard_normal(3) * 5).astype(np.float32))
             for _ in range(n_parts)]
    for backend in BACKENDS:
        flat = rk.merge_partials(parts, backend=backend)
        perm = [parts[i] for i in rng.permutation(n_parts)]
        shuffled = rk.merge_partials(perm, backend=backend)
        cut = int(rng.integers(1, n_parts + 1))
        nested = rk.merge_partials([rk.merge_partials(perm[:cut], backend=backend)]
                                   + ([rk.merge_partials(perm[cut:], backend=backend)] if cut < n_parts else []),
                                   backend=backend)
        for other in (shuffled, nested):
            np.testing.assert_allclose(other[0], flat[0], atol=2e-6, rtol=1e-5)
            np.testing.assert_allclose(other[1], flat[1], atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_part_is_the_merge_identity(backend, rng):
    o = rng.standard_normal((5, 7)).astype(np.float32)
    l = rng.standard_normal(5).astype(np.float32)
    empty = (np.zeros_like(o), np.full(5, -np.inf, np.float32))
    out, lse = rk.merge_partials([empty, (o, l), empty], backend=backend)
    np.testing.assert_allclose(out, o, atol=1e-7)
    np.testing.assert_allclose(lse, l, atol=1e-7)
    out, lse = rk.merge_partials([empty, empty], backend=backend)
    assert not out.any() and np.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_tensors_cross_over(backend, rng):
    torch = pytest.importorskip("torch")
    q = rng.standard_normal((4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 10, 8)).astype(np.float32)
    a = rk.full_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(k), backend=backend)
    np.testing.assert_allclose(a, rk.full_attention(q, k, k, backend=backend), atol=1e-7)


BAD_INPUTS = [
    (dict(q=np.zeros((4, 8, 2, 1), np.float32)), ValueError, "q must have shape"),
    (dict(k=np.zeros((2, 10), np.float32)), ValueError, "k must have shape"),
    (dict(v=np.zeros((2, 9, 8), np.float32)), ValueError, "k and v must agree"),
    (dict(q=np.zeros((4, 7), np.float32)), ValueError, "head_dim 7"),
    (dict(q=np.zeros((3, 8), np.float32)), ValueError, "multiple of k's 2 KV heads"),
    (dict(q=np.zeros((4, 8), np.int32)), TypeError, "floating dtype"),
    (dict(q=[[0.0] * 8] * 4), TypeError, "q must be a NumPy"),
    (dict(k=np.full((2, 10, 8), np.nan, np.float32)), ValueError, "k contains NaN"),
    (dict(scale=-1.0), ValueError, "scale must be"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(q=np.zeros((4, 11, 8), np.float32), causal=True), ValueError, "at least T=11 keys"),
]


@pytest.mark.parametrize("change,exc,msg", BAD_INPUTS)
def test_bad_input_names_the_argument(change, exc, msg):
    args = dict(q=np.zeros((4, 8), np.float32), k=np.zeros((2, 10, 8), np.float32), v=np.zeros((2, 10, 8), np.float32))
    args.update(change)
    with pytest.raises(exc, match=msg):
        rk.full_attention(**args)


def test_merge_rejects_bad_parts():
    with pytest.raises(ValueError, match="at least one"):
        rk.merge_partials([])
    with pytest.raises(ValueError, match="without its last axis"):
        rk.merge_partials([(np.zeros((3, 4), np.float32), np.zeros(4, np.float32))])
    with pytest.raises(TypeError, match=r"parts\[0\]"):
        rk.merge_partials([np.zeros(3)])


def test_set_backend_changes_the_default():
    before = rk.get_backend()
    try:
        rk.set_backend("fast")
        assert rk.get_backend() == "fast"
        with pytest.raises(ValueError, match="backend must be one of"):
            rk.set_backend("cuda")
    finally:
        rk.set_backend(before)


# ---- issue 13: silent-wrong paths and loose checks ---------------------------------------------------

@pytest.mark.parametrize("where", ["k_first", "k_middle", "k_only_key", "q", "v"])
@pytest.mark.parametrize("block", [False, True])
def test_nan_inputs_propagate_alike_on_both_backends(where, block, rng):
    """check_finite=False with a NaN: every row that reads it is NaN on both backends, never a clean number.

    Before the fix the reference turned a NaN denominator into 0 (a finite, wrong output) and the fast
    path dropped a row whose every score was NaN as if it saw no key (0, -inf)."""
    n = 1 if where == "k_only_key" else 9
    q = rng.standard_normal((4, 3, 8) if block else (4, 8)).astype(np.float32)
    k = rng.standard_normal((2, n, 8)).astype(np.float32)
    v = rng.standard_normal((2, n, 8)).astype(np.float32)
    clean = rk.partial_attention(q, k, v)                     # before the NaN goes in
    if where == "q":
        q[1, ..., 2] = np.nan                         # query head 1 only
        bad = np.array([False, True, False, False])
    else:
        (k if where.startswith("k") else v)[0, 0 if where != "k_middle" else 4, 3] = np.nan
        bad = np.array([True, True, False, False])    # KV head 0 is read by query heads 0 and 1
    results = {b: rk.partial_attention(q, k, v, backend=b, check_finite=False) for b in BACKENDS}
    for b, (out, lse) in results.items():
        if where == "v":                              # a NaN value coordinate poisons that coordinate only
            assert np.isnan(out[bad][..., 3]).all() and not np.isnan(lse).any(), b
        else:
            assert np.isnan(out[bad]).all() and np.isnan(lse[bad]).all(), b
        np.testing.assert_allclose(out[~bad], clean[0][~bad], atol=1e-5, err_msg=b)   # other rows untouched
    out_r, out_f = results["reference"][0], results["fast"][0]
    np.testing.assert_array_equal(np.isnan(out_r), np.isnan(out_f))
    with pytest.raises(ValueError, match="NaN"):     # the default still refuses them at the boundary
        rk.full_attention(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_lse_propagates_through_the_backend_merge(backend):
    """The backends' own merge (used inside every index) keeps a NaN part NaN instead of dropping it."""
    mod = __import__(f"retrokv.{backend}", fromlist=["attention"]).attention
    o = np.ones((2, 3), np.float32)
    out, lse = mod.merge_partials([(o, np.array([0.0, np.nan], np.float32)), (o, np.zeros(2, np.float32))])
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all() and np.isnan(lse[1])


@pytest.mark.parametrize("shape", [(0, 3, 8), (4, 0, 8), (0, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_query_axes_give_empty_results_on_both_backends(shape, causal, rng):
    """Hq = 0 or T = 0: both backends return empty (out, lse) of the right shapes (the reference crashed)."""
    q = np.zeros(shape, np.float32)
    k = rng.standard_normal((2, 5, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 6)).astype(np.float32)
    for b in BACKENDS:
        out, lse = rk.partial_attention(q, k, v, causal=causal, backend=b)
        assert out.shape == shape[:-1] + (6,) and lse.shape == shape[:-1] and out.dtype == np.float32, b


@pytest.mark.parametrize("causal", ["no", 1, 0, None, np.int64(1)])
def test_causal_must_be_a_real_bool(causal):
    """``causal="no"`` used to act as True; only bools (Python or NumPy) are accepted."""
    q, k = np.zeros((2, 3, 4), np.float32), np.zeros((1, 5, 4), np.float32)
    with pytest.raises(TypeError, match="causal must be a bool"):
        rk.full_attention(q, k, k, causal=causal)


def test_numpy_bool_causal_and_numpy_scale_are_accepted(rng):
    q = rng.standard_normal((2, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(rk.full_attention(q, k, k, causal=np.bool_(True), scale=np.float32(0.5)),
                                  rk.full_attention(q, k, k, causal=True, scale=0.5))
    np.testing.assert_array_equal(rk.full_attention(q, k, k, scale=np.int64(2)), rk.full_attention(q, k, k, scale=2.0))


@pytest.mark.parametrize("scale,exc", [(True, TypeError), ("0.5", TypeError), (np.array([0.5]), TypeError),
                                       (0.0, ValueError), (float("inf"), ValueError)])
def test_scale_must_be_a_positive_number(scale, exc):
    q, k = np.zeros((2, 4), np.float32), np.zeros((1, 5, 4), np.float32)
    with pytest.raises(exc, match="scale must be"):
        rk.full_attention(q, k, k, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_torch_tensors_are_upcast(backend, dtype, rng):
    """torch bfloat16 has no ``.numpy()``: it used to raise ``Got unsupported ScalarType BFloat16``."""
    torch = pytest.importorskip("torch")
    tq = torch.from_numpy(rng.standard_normal((4, 3, 8)).astype(np.float32)).to(getattr(torch, dtype))
    tk = torch.from_numpy(rng.standard_normal((2, 6, 8)).astype(np.float32)).to(getattr(torch, dtype))
    out = rk.full_attention(tq, tk, tk, causal=True, backend=backend)
    q32, k32 = tq.float().numpy(), tk.float().numpy()          # the exact values the tensors hold
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, rk.full_attention(q32, k32, k32, causal=True, backend=backend), atol=1e-7)
    o2, l2 = rk.merge_partials([(tq[:, 0], tq[:, 0, 0]), (tq[:, 1], tq[:, 1, 0])], backend=backend)
    assert o2.shape == (4, 8) and np.isfinite(l2).all()
