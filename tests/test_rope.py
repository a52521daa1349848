"""RoPE: bit-for-bit against transformers, the relative-position identity, and fast == reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import retrokv as rk
from retrokv.reference.rope import rope_cos_sin
from retrokv.testing.invariants import check_rotation_composes


@st.composite
def rope_case(draw):
    h = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    d = draw(st.sampled_from([2, 8, 64, 128]))
    theta = draw(st.sampled_from([10000.0, 1e5, 5e5]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((h, n, d)) * draw(st.sampled_from([0.5, 3.0, 30.0]))).astype(np.float32)
    pos = rng.integers(0, draw(st.sampled_from([16, 8192, 1 << 20])), n)
    return x, pos, theta


@given(rope_case())
def test_matches_transformers_apply_rotary_pos_emb_bit_for_bit(case):
    torch = pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, pos, theta = case
    cos, sin = rope_cos_sin(pos, x.shape[-1], theta)                       # (N, d)
    tq, tk = apply_rotary_pos_emb(torch.from_numpy(x)[None], torch.from_numpy(x)[None],
                                  torch.from_numpy(cos)[None], torch.from_numpy(sin)[None])
    for backend in ("reference", "fast"):
        ours = rk.apply_rope(x, pos, theta=theta, backend=backend)
        assert np.array_equal(ours, tq[0].numpy()), backend
        assert np.array_equal(ours, tk[0].numpy()), backend


def test_cos_sin_tables_match_transformers_rotary_embedding():
    """Our tables agree with LlamaRotaryEmbedding to float32 rounding (we round cos/sin from float64 once)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, rope_theta=1e5, max_position_embeddings=8192)
    emb = LlamaRotaryEmbedding(cfg)
    pos = np.arange(0, 8192, 7)
    cos_t, sin_t = emb(torch.zeros(1, 1, 64), torch.from_numpy(pos)[None])
    cos, sin = rope_cos_sin(pos, 64, 1e5)
    assert np.abs(cos - cos_t[0].numpy()).max() <= 2.5e-7
    assert np.abs(sin - sin_t[0].numpy()).max() <= 2.5e-7


@given(rope_case(), st.sampled_from(["half", "interleaved"]))
def test_fast_is_bit_identical_to_reference(case, convention):
    x, pos, theta = case
    a = rk.apply_rope(x, pos, theta=theta, convention=convention, backend="reference")
    b = rk.apply_rope(x, pos, theta=theta, convention=convention, backend="fast")
    assert np.array_equal(a, b)


@given(st.integers(0, 4096), st.integers(0, 4096), st.sampled_from(["half", "interleaved"]), st.integers(0, 2**31 - 1))
def test_scores_depend_only_on_relative_position(a, b, convention, seed):
    """<R(a) q, R(b) k> = <R(a - b) q, k> (RoFormer §3.4.2); the identity LazyAttention builds on."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 64)).astype(np.float32)
    for backend in ("reference", "fast"):
        lhs = rk.apply_rope(q, a, theta=1e4, convention=convention, backend=backend) @ \
            rk.apply_rope(k, b, theta=1e4, convention=convention, backend=backend)
        rhs = rk.apply_rope(q, a - b, theta=1e4, convention=convention, backend=backend) @ k
        assert abs(lhs - rhs) <= 2e-3 * (1 + abs(rhs))


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_rotate_by_composes_and_inverts(backend, rng):
    x = rng.standard_normal((3, 10, 64)).astype(np.float32)
    p = np.arange(10)
    at_p = rk.apply_rope(x, p, backend=backend)
    # R(37) R(p) x = R(p + 37) x, with this test's own tolerance
    check_rotation_composes(lambda y, pos: rk.rotate_by(y, pos, backend=backend), 37, p, x, atol=2e-5)
    np.testing.assert_allclose(rk.rotate_by(at_p, -p, backend=backend), x, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(at_p, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)  # orthogonal


def test_interleaved_is_a_permutation_of_half():
    """Both conventions rotate the same pairs, only laid out differently."""
    rng = np.random.default_rng(1)
    d = 16
    x_half = rng.standard_normal((5, d)).astype(np.float32)
    perm = np.empty(d, int)
    perm[0::2], perm[1::2] = np.arange(d // 2), np.arange(d // 2, d)       # interleaved slot -> half slot
    x_int = x_half[:, perm]
    pos = np.arange(5)
    np.testing.assert_array_equal(rk.apply_rope(x_int, pos, convention="interleaved"),
                                  rk.apply_rope(x_half, pos)[:, perm])


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(x=np.zeros((2, 7), np.float32)), ValueError, "even last axis"),
    (dict(positions=np.zeros(3, np.float32)), TypeError, "positions must be integers"),
    (dict(positions=np.arange(5)), ValueError, "do not broadcast"),
    (dict(convention="neox"), ValueError, "convention must be"),
    (dict(theta=0.5), ValueError, "theta must be"),
    (dict(x=np.zeros((2, 4), np.int64)), TypeError, "floating dtype"),
])
def test_bad_input_names_the_argument(kwargs, exc, msg):
    args = dict(x=np.zeros((2, 3, 8), np.float32), positions=np.arange(3))
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        rk.apply_rope(**args)


# ---- issue 13: empty axes and numbers ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 0), (0, 8), (2, 0, 4), (0,)])
def test_empty_axes_behave_alike_on_both_backends(shape):
    """d = 0 crashed the fast path with a reshape error while the reference returned empty."""
    x = np.zeros(shape, np.float32)
    pos = np.arange(shape[-2]) if len(shape) > 1 else 0
    for fn in (rk.apply_rope, rk.rotate_by):
        r = fn(x, pos, backend="reference")
        f = fn(x, pos, backend="fast")
        assert r.shape == f.shape == shape and r.dtype == f.dtype == np.float32


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("theta", [np.float32(1e5), np.float64(1e5), np.int64(100000), 100000])
def test_numpy_scalar_theta_is_accepted(backend, theta):
    """``theta=np.float32(1e5)`` (a model config read through NumPy) used to be refused as "not a number"."""
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    want = rk.apply_rope(x, np.arange(3), theta=1e5, backend=backend)
    np.testing.assert_array_equal(rk.apply_rope(x, np.arange(3), theta=theta, backend=backend), want)
    np.testing.assert_array_equal(rk.rotate_by(x, 5, theta=theta, backend=backend),
                                  rk.rotate_by(x, 5, theta=1e5, backend=backend))


@pytest.mark.parametrize("theta,exc", [(True, TypeError), ("1e4", TypeError), (np.array([1e4]), TypeError),
                                       (1.0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError)])
def test_theta_must_be_a_finite_number_above_one(theta, exc):
    with pytest.raises(exc, match="theta must be"):
        rk.apply_rope(np.zeros((2, 4), np.float32), np.arange(2), theta=theta)
