"""Bad-input sweep (issue 13): every public entry point, both backends, hypothesis-drawn malformed inputs.

For each argument of each entry point, every malformed value must either

* raise ``ValueError`` or ``TypeError`` whose message names the argument (``ERR`` below), or
* when it is only another spelling of a valid input (float64 or float16 arrays, a strided or read-only
  view, a torch tensor, NumPy scalars), give the same result as the canonical input (an equivalent
  value below), or
* when it is a different but valid input (an empty axis, another ``dv``), run and agree with the
  reference backend (``REF``).

Never another exception (``IndexError``, ``AttributeError``, a reshape or Numba typing error), never a
silent result. The canonical configurations are exact (budget 100%, top-k over every key, ...), so the
canonical results are also checked against full attention.

Sizes are tiny and drawn (``Hkv = 2`` so that ``Hq + 1`` heads is never a valid GQA group; ``T`` odd so
that dropping the head axis of a query block never leaves a valid decode query; ``dv != d``); every
mutation of an argument runs in each example, and hypothesis draws the sizes, the values and where a
NaN goes. Few examples per case keep the file fast (the Numba kernels are cached by the other tests).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import retrokv as rk
from retrokv.baselines import (IVFConfig, IVFIndex, QuestConfig, QuestIndex, StreamingConfig, StreamingLLM,
                               TopKConfig, TopKOracle)
from retrokv.graph_index import GraphConfig, GraphIndex
from retrokv.dense import DenseConfig, DenseIndex
from retrokv.lazy import DocumentStore, LazyConfig
from retrokv.wave_index import WaveConfig, WaveIndex
from retrokv.wave_buffer import WaveBuffer

try:
    import torch
except ImportError:      # the torch spellings are skipped without torch
    torch = None

BACKENDS = ["reference", "fast"]
ERR = "error"            # the call must raise ValueError/TypeError naming the argument
REF = "reference"        # a valid input: must run, and the backend must agree with the reference backend
SWEEP = settings(max_examples=max(2, settings.default.max_examples // 10), deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))


# ---- drawing canonical inputs -----------------------------------------------------------------------

@st.composite
def sizes(draw, n_min=1, n_max=8):
    hkv, g = 2, draw(st.integers(1, 3))
    t = draw(st.sampled_from([1, 3, 5]))
    n = draw(st.integers(max(n_min, t), n_max))
    d = draw(st.sampled_from([4, 6]))
    dv = draw(st.sampled_from([3, 5]))
    return dict(hkv=hkv, hq=hkv * g, t=t, n=n, d=d, dv=dv, seed=draw(st.integers(0, 2**31 - 1)))


def arrays(s, *shapes):
    rng = np.random.default_rng(s["seed"])
    return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def with_value(a, i, value):
    a = a.astype(np.float32).copy()
    a.reshape(-1)[i] = value
    return a


def array_kinds(a, draw, nan=ERR):
    """Malformed and equivalent spellings of a valid float32 array ``a``: ``(label, value, expect)``."""
    kinds = [("int32", a.astype(np.int32), ERR), ("complex", a.astype(np.complex64), ERR),
             ("object", a.astype(object), ERR), ("bool", a > 0, ERR), ("list", a.tolist(), ERR),
             ("float", 1.0, ERR), ("None", None, ERR), ("str", "x", ERR),
             ("float64", a.astype(np.float64), a), ("float16", a.astype(np.float16), a.astype(np.float16).astype(np.float32)),
             ("strided", np.repeat(a, 2, axis=-1)[..., ::2], a), ("read-only", read_only(a), a)]
    if torch is not None:
        tb = torch.from_numpy(a.copy()).to(torch.bfloat16)
        kinds += [("torch", torch.from_numpy(a.copy()), a), ("torch bf16", tb, tb.float().numpy()),
                  ("torch int", torch.from_numpy(a.astype(np.int64)), ERR)]
    if a.size:
        i = draw(st.integers(0, a.size - 1))
        kinds += [(f"{v} at {i}", with_value(a, i, v), nan) for v in (np.nan, np.inf, -np.inf)]
    return kinds


# ---- checking one mutation ----------------------------------------------------------------------------

def _names(message, names):
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names)


def _same(got, want, what):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        for g, w in zip(got, want):
            _same(g, w, what)
        return
    if isinstance(want, (WaveConfig, GraphConfig, LazyConfig, StreamingConfig, TopKConfig, IVFConfig, QuestConfig)):
        assert got == want, what
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, equal_nan=True, err_msg=what)


def check(call, name, kinds, names=None, ref_call=None):
    """Run ``call(value)`` for every ``(label, value, expect)`` of ``kinds`` (see the module docstring)."""
    names = names or [name]
    for kind in kinds:
        label, value, expect = kind if len(kind) == 3 else (repr(kind[0])[:30], *kind)
        what = f"{name} = {label}"
        if isinstance(expect, str) and expect == ERR:
            try:
                result = call(value)
            except (ValueError, TypeError) as e:
                assert _names(str(e), names), f"{what}: {type(e).__name__} does not name {names}: {e}"
            else:
                raise AssertionError(f"{what}: returned {type(result).__name__} instead of raising")
        elif isinstance(expect, str) and expect == REF:
            got = call(value)
            if ref_call is not None:
                _same(got, ref_call(value), what + " (against the reference backend)")
        else:
            _same(call(value), call(expect), what)


def full(q, k, v, causal=False):
    return rk.full_attention(q, k, v, causal=causal, backend="reference")


# ---- attention and RoPE -------------------------------------------------------------------------------

def attention_kinds(q, k, v, draw):
    """Per-argument kinds shared by full_attention and partial_attention."""
    return {
        "q": array_kinds(q, draw) + [
            ("extra axis", q[None], ERR), ("rank 1", q.reshape(-1), ERR), ("Hq + 1", np.concatenate([q, q[:1]]), ERR),
            ("d - 1", q[..., :-1], ERR), ("d = 0", q[..., :0], ERR), ("Hq = 0", q[:0], REF)]
        + ([("drop head axis", q[0], ERR), ("T = 0", q[:, :0], REF), ("T - 1", q[:, 1:], REF)] if q.ndim == 3 else []),
        "k": array_kinds(k, draw) + [
            ("extra axis", k[None], ERR), ("rank 2", k[0], ERR), ("Hkv 1 vs v's 2", k[:1], ERR),
            ("N - 1", k[:, 1:], ERR), ("d - 1", k[..., :-1], ERR)],
        "v": array_kinds(v, draw) + [
            ("extra axis", v[None], ERR), ("rank 2", v[0], ERR), ("Hkv 1 vs k's 2", v[:1], ERR),
            ("N - 1", v[:, 1:], ERR), ("dv - 1", v[..., :-1], REF)],
        "scale": [(True, ERR), ("0.5", ERR), (-1.0, ERR), (0.0, ERR), (float("nan"), ERR), (float("inf"), ERR),
                  (np.array([0.5]), ERR), (np.float32(0.5), 0.5), (np.int64(2), 2.0), (None, REF)],
        "causal": [("no", ERR), (1, ERR), (None, ERR), (np.bool_(True), True)],
        "backend": [("gpu", ERR), (1, ERR), ("FAST", ERR)],
        "check_finite": [("no", ERR), (np.bool_(True), True)],
    }


@pytest.mark.parametrize("fn", ["full_attention", "partial_attention"])
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("arg", ["q", "k", "v", "scale", "causal", "backend", "check_finite"])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(), data=st.data())
def test_attention(fn, decode, arg, backend, s, data):
    q, k, v = arrays(s, (s["hq"], s["d"]) if decode else (s["hq"], s["t"], s["d"]),
                     (s["hkv"], s["n"], s["d"]), (s["hkv"], s["n"], s["dv"]))
    base = dict(q=q, k=k, v=v, causal=not decode, scale=0.5, backend=backend, check_finite=True)
    f = getattr(rk, fn)
    out = f(**base)
    want = full(q, k, v, causal=not decode) if fn == "full_attention" else None
    if want is not None:
        np.testing.assert_allclose(out, rk.full_attention(q, k, v, causal=not decode, scale=0.5), atol=1e-5)
    check(lambda x: f(**{**base, arg: x}), arg, attention_kinds(q, k, v, data.draw)[arg],
          ref_call=lambda x: f(**{**base, arg: x, "backend": "reference"}))


def merge_kinds(parts, draw):
    (o, l), other = parts[0], parts[1]
    return {
        "parts": [([], ERR), (None, ERR), ("xy", ERR), (42, ERR), ([o], ERR), ([(o,)], ERR), ([(o, l, l)], ERR),
                  (tuple(parts), list(parts)), ((p for p in parts), list(parts))],
        "out": array_kinds(o, draw) + [
            ("extra axis", o[None], ERR), ("dv - 1", o[..., :-1], ERR), ("rank 0", o.reshape(-1)[0], ERR),
            ("0-d array", np.asarray(o.reshape(-1)[0]), ERR)],
        "lse": [x for x in array_kinds(l, draw) if not x[0].startswith("-inf")] + [
            ("extra axis", l[None], ERR), ("all -inf (an empty part)", np.full_like(l, -np.inf), REF)],
    }


@pytest.mark.parametrize("arg", ["parts", "out", "lse"])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=2), data=st.data())
def test_merge_partials(arg, backend, s, data):
    q, k, v = arrays(s, (s["hq"], s["d"]), (s["hkv"], s["n"], s["d"]), (s["hkv"], s["n"], s["dv"]))
    parts = [rk.partial_attention(q, k[:, :1], v[:, :1]), rk.partial_attention(q, k[:, 1:], v[:, 1:])]
    np.testing.assert_allclose(rk.merge_partials(parts, backend=backend)[0], full(q, k, v), atol=1e-5)
    kinds = merge_kinds(parts, data.draw)[arg]
    if arg == "parts":
        run = lambda x: rk.merge_partials(x, backend=backend)                              # noqa: E731
        check(run, "parts", kinds)
    else:
        i = 0 if arg == "out" else 1
        run = lambda x, b=backend: rk.merge_partials(                                      # noqa: E731
            [tuple(x if j == i else p for j, p in enumerate(parts[0])), parts[1]], backend=b)
        check(run, arg, kinds, names=[f"parts[0].{arg}", "parts[0]"],
              ref_call=lambda x: run(x, "reference"))


def rope_kinds(x, pos, draw, fn):
    p_bad = [(pos.astype(np.float32), ERR), (pos > 0, ERR), (pos.astype(object), ERR), ("3", ERR), (None, ERR),
             (np.arange(pos.shape[0] + 1), ERR), (pos.tolist(), pos), (pos.astype(np.int32), pos),
             (pos.astype(np.uint16), pos), (np.int64(2), np.full_like(pos, 2)), (pos[None], pos)]
    return {
        # NaN/inf in x propagate element-wise (RoPE is linear): the reference on the same values decides
        "x": array_kinds(x, draw, nan=REF) + [
            ("odd d", x[..., :-1], ERR), ("rank 0", np.asarray(x.reshape(-1)[0]), ERR),
            ("extra axis (broadcasts)", x[None], REF), ("d = 0", x[..., :0], REF)],
        "positions": p_bad,
        "theta": [(True, ERR), ("1e4", ERR), (1.0, ERR), (0.5, ERR), (float("nan"), ERR), (float("inf"), ERR),
                  (None, ERR), (np.array([1e4]), ERR), (np.float32(1e4), 1e4), (np.int64(10000), 1e4), (10000, 1e4)],
        "convention": [("neox", ERR), (None, ERR), (1, ERR), (np.array(["half", "half"]), ERR), ("HALF", ERR)],
    }


@pytest.mark.parametrize("fn", ["apply_rope", "rotate_by"])
@pytest.mark.parametrize("arg", ["x", "positions", "theta", "convention"])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(), data=st.data())
def test_rope(fn, arg, backend, s, data):
    x, = arrays(s, (s["hq"], s["t"], s["d"]))
    pos = np.arange(s["t"]) * 7
    f = getattr(rk, fn)
    base = dict(positions=pos, theta=1e4, convention="half")

    def run(val, b=backend):
        kw = {**base, arg: val} if arg != "x" else base
        return f(val if arg == "x" else x, kw["positions"], theta=kw["theta"], convention=kw["convention"], backend=b)

    # rotate_by's arguments are x_rot and delta; x's shape problems may be reported against the positions
    # that no longer broadcast to it
    own = {"x": "x", "positions": "positions"} if fn == "apply_rope" else {"x": "x_rot", "positions": "delta"}
    names = [own["x"], own["positions"]] if arg == "x" else [own.get(arg, arg)]
    check(run, arg, rope_kinds(x, pos, data.draw, fn)[arg], names=names, ref_call=lambda v: run(v, "reference"))


# ---- decode indexes --------------------------------------------------------------------------------------

def kv_kinds(k, v, kn, vn, draw, single=False):
    """Kinds for one layer's keys/values ``(Hkv, N, d)`` (or one token ``(Hkv, d)`` with ``single``)."""
    if single:
        ks = [("rank 3 with a rank-2 v", k[:, None], ERR), ("Hkv 1", k[:1], ERR), ("d - 1", k[..., :-1], ERR),
              ("rank 1", k.reshape(-1), ERR), ("extra axis", k[None, None], ERR)]
        vs = [("Hkv 1", v[:1], ERR), ("dv - 1", v[..., :-1], ERR), ("rank 1", v.reshape(-1), ERR)]
    else:
        ks = [("extra axis", k[None], ERR), ("rank 2", k[0], ERR), ("Hkv 1 vs 2", k[:1], ERR),
              ("N - 1", k[:, 1:], ERR), ("d = 0", k[..., :0], ERR)]
        vs = [("extra axis", v[None], ERR), ("rank 2", v[0], ERR), ("Hkv 1 vs 2", v[:1], ERR), ("N - 1", v[:, 1:], ERR)]
    return {kn: array_kinds(k, draw) + ks, vn: array_kinds(v, draw) + vs}


def q_kinds(q, draw):
    return array_kinds(q, draw) + [("rank 1", q.reshape(-1), ERR), ("rank 4", q[:, None, None], ERR),
                                   ("Hq + 1", np.concatenate([q, q[:1]]), ERR), ("Hq = 0", q[:0], ERR),
                                   ("d - 1", q[..., :-1], ERR)]


def int_kinds(good, lo=0, optional=False):
    """Malformed spellings of an int argument ``>= lo`` whose valid value is ``good``."""
    kinds = [(True, ERR), (1.5, ERR), (float(good), ERR), ("3", ERR), (lo - 1, ERR), (np.int64(good), good)]
    if not optional:
        kinds.append((None, ERR))
    return kinds


SMALL_WAVE = dict(min_index_tokens=0, n_sink=2, n_local=3, tokens_per_cluster=4, segment_tokens=16, kmeans_iters=2, update_every=4,
                  update_clusters=2, retrieval_budget=1.0)
TINY_GRAPH = dict(n_sink=2, n_recent=2, top_k=64, n_query_neighbors=4, max_degree=4, pool_cap=8, search_L=64)
EXACT = {   # configurations under which attend is full attention
    "full": DenseConfig,
    "wave": lambda: WaveConfig(**SMALL_WAVE),
    "topk": lambda: TopKConfig(n_sink=2, n_recent=2, top_k=64),
    "streaming": lambda: StreamingConfig(n_sink=2, n_recent=64),
    "ivf": lambda: IVFConfig(n_sink=2, n_recent=2, top_k=64, probe_fraction=1.0, iters=2),
    "quest": lambda: QuestConfig(n_sink=2, n_recent=2, page_size=4, token_budget=64, top_k=64),
}
INDEXES = {"wave": WaveIndex, "topk": TopKOracle, "streaming": StreamingLLM, "ivf": IVFIndex, "quest": QuestIndex,
           "graph": GraphIndex, "full": DenseIndex}


def build(method, keys, values, pq=None, config="exact", backend="reference", **kw):
    cls = INDEXES[method]
    if method == "graph":
        config = GraphConfig(**TINY_GRAPH) if config == "exact" else config
        return cls.build(keys, values, pq, config=config, backend=backend, **kw)
    config = EXACT[method]() if config == "exact" else config
    return cls.build(keys, values, config=config, backend=backend, **kw)


def index_inputs(s):
    k, v, q, pq, nk, nv = arrays(s, (2, s["n"], s["d"]), (2, s["n"], s["dv"]), (s["hq"], s["d"]),
                                 (s["hq"], 5, s["d"]), (2, s["d"]), (2, s["dv"]))
    return k, v, q, pq, nk, nv


BUILD_ARGS = {m: ["keys", "values", "config"] + (["prefill_queries"] if m == "graph" else []) for m in INDEXES}


def config_kinds(method):
    other = GraphConfig() if method != "graph" else WaveConfig()
    kinds = [({"n_sink": 2}, ERR), ("x", ERR), (other, ERR)]
    return kinds


@pytest.mark.parametrize("method,arg", [(m, a) for m in INDEXES for a in BUILD_ARGS[m]])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=20, n_max=28), data=st.data())
def test_index_build(method, arg, backend, s, data):
    k, v, q, pq, _, _ = index_inputs(s)
    base = dict(keys=k, values=v, pq=pq, config="exact", backend=backend)
    idx = build(method, **base)
    if method != "graph":
        np.testing.assert_allclose(idx.attend(q), full(q, k, v), atol=1e-5)
    key = "pq" if arg == "prefill_queries" else arg

    def run(x, b=backend):
        return build(method, **{**base, key: x, "backend": b}).attend(q)

    if arg in ("keys", "values"):
        kinds = kv_kinds(k, v, "keys", "values", data.draw)[arg]
        if arg == "values":
            kinds = kinds + [("dv - 1", v[..., :-1], REF)]
    elif arg == "prefill_queries":
        kinds = array_kinds(pq, data.draw) + [("rank 2", pq[0], ERR), ("Hq + 1", np.concatenate([pq, pq[:1]]), ERR),
                                              ("d - 1", pq[..., :-1], ERR), ("extra axis", pq[None], ERR)]
    else:
        kinds = config_kinds(method)
    check(run, arg, kinds, ref_call=lambda x: run(x, "reference"))


@pytest.mark.parametrize("method", list(INDEXES))
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=20, n_max=28), data=st.data())
def test_index_build_overrides_and_backend(method, backend, s, data):
    """Keyword overrides of config fields (baselines, graph) and the backend name."""
    k, v, q, pq, _, _ = index_inputs(s)
    run = lambda **kw: build(method, k, v, pq, backend=kw.pop("backend", backend), **kw).attend(q)   # noqa: E731
    check(lambda b: run(backend=b), "backend", [("gpu", ERR), (1, ERR), ("FAST", ERR)])
    if method == "full":
        return                                            # DenseConfig has no fields
    field = {"streaming": "n_recent", "wave": "n_local"}.get(method, "top_k")
    check(lambda x: run(**{field: x}), field, [(0 if field == "top_k" else -1, ERR), (True, ERR), (1.5, ERR),
                                               ("3", ERR), (np.int64(64), 64)])
    with pytest.raises(TypeError, match="unknown"):
        run(no_such_field=3)


@pytest.mark.parametrize("method", list(INDEXES))
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=20, n_max=28), data=st.data())
def test_index_attend_and_search(method, backend, s, data):
    k, v, q, pq, _, _ = index_inputs(s)
    idx = build(method, k, v, pq, backend=backend)
    ref = build(method, k, v, pq, backend="reference")
    check(idx.attend, "q", q_kinds(q, data.draw), ref_call=ref.attend)
    if method in ("wave", "streaming", "full"):
        return                                            # no search (wave: zones; StreamingLLM: evicts; dense)
    check(lambda x: idx.search(x, 4), "q", q_kinds(q, data.draw), ref_call=lambda x: ref.search(x, 4))
    check(lambda kk: idx.search(q, kk), "k", int_kinds(3, lo=1, optional=True) + [(None, REF)],
          ref_call=lambda kk: ref.search(q, kk))


@pytest.mark.parametrize("method", list(INDEXES))
@pytest.mark.parametrize("arg", ["k", "v"])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=20, n_max=28), data=st.data())
def test_index_append(method, arg, backend, s, data):
    k, v, q, pq, nk, nv = index_inputs(s)

    def run(x, b=backend):
        idx = build(method, k, v, pq, backend=b)
        idx.append(x if arg == "k" else nk, x if arg == "v" else nv)
        return idx.attend(q)

    if method != "graph":                                  # generated tokens are attended exactly
        np.testing.assert_allclose(run(nk if arg == "k" else nv),
                                   full(q, np.concatenate([k, nk[:, None]], 1), np.concatenate([v, nv[:, None]], 1)),
                                   atol=1e-5)
    kinds = kv_kinds(nk, nv, "k", "v", data.draw, single=True)[arg]
    check(run, arg, kinds, names=["k", "v"], ref_call=lambda x: run(x, "reference"))


# ---- wave buffer ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=24, n_max=32), data=st.data())
def test_wave_buffer(backend, s, data):
    k, v, q, *_ = index_inputs(s)
    idx = build("wave", k, v, backend=backend)
    make = lambda **kw: WaveBuffer(idx, **kw)              # noqa: E731
    np.testing.assert_allclose(idx.attend(q, buffer=make()), full(q, k, v), atol=1e-5)
    check(lambda x: WaveBuffer(x), "index", [(None, ERR), ("x", ERR), (k, ERR)])
    check(lambda x: idx.attend(q, buffer=make(cache_fraction=x)), "cache_fraction",
          [(True, ERR), ("0.1", ERR), (-0.1, ERR), (1.5, ERR), (float("nan"), ERR), (None, ERR),
           (np.float32(0.5), 0.5), (np.int64(1), 1.0)])
    check(lambda x: idx.attend(q, buffer=make(block_size=x)), "block_size", int_kinds(4, lo=1))
    other = WaveBuffer(build("wave", k, v, backend=backend))
    check(lambda x: idx.attend(q, buffer=x), "buffer", [("x", ERR), (other, ERR), (None, make())])
    buf = make()
    c = idx.n_clusters
    ret = np.zeros((2, 1), np.int64)
    check(buf.gather, "retrieval", [(ret.astype(np.float32), ERR), (ret > 0, ERR), (ret[0], ERR), (ret[None], ERR),
                                    (np.full((2, 1), c), ERR), (np.full((2, 1), -1), ERR), (None, ERR), ("x", ERR),
                                    (np.zeros((3, 1), np.int64), ERR)])
    check(lambda i: buf.read_cluster(0, i), "i", [(1.5, ERR), (True, ERR), (c, ERR), (-1, ERR), (None, ERR),
                                                   (np.int64(0), 0)])


# ---- LazyAttention --------------------------------------------------------------------------------------

def lazy_setup(s, backend):
    rng = np.random.default_rng(s["seed"])
    store = DocumentStore(LazyConfig(block=4, theta=1e4), backend=backend)
    docs = []
    for i, n in enumerate((s["n"], 3)):
        toks = list(range(100 * (i + 1), 100 * (i + 1) + n))
        kd = rk.apply_rope(rng.standard_normal((2, 2, n, s["d"])).astype(np.float32), np.arange(n), theta=1e4)
        vd = rng.standard_normal((2, 2, n, s["dv"])).astype(np.float32)
        store.put(toks, kd, vd)
        docs.append((toks, kd, vd))
    req = store.request([docs[1][0], docs[0][0]], start=2)
    q, kt, vt = arrays(s, (s["hq"], s["t"], s["d"]), (2, s["t"] + 1, s["d"]), (2, s["t"] + 1, s["dv"]))
    return store, docs, req, q, kt, vt


@pytest.mark.parametrize("arg", ["tokens", "keys", "values", "key", "replace"])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=2), data=st.data())
def test_document_store_put(arg, backend, s, data):
    _, docs, *_ = lazy_setup(s, backend)
    toks, kd, vd = docs[0]
    base = dict(tokens=toks, keys=kd, values=vd, key=None, replace=False)

    def run(x, b=backend):
        st_ = DocumentStore(LazyConfig(block=4, theta=1e4), backend=b)
        kw = {**base, arg: x}
        d = st_.put(kw["tokens"], kw["keys"], kw["values"], key=kw["key"], replace=kw["replace"])
        return st_.read(d.key)

    tk = np.asarray(toks)
    kinds = {
        "tokens": [(tk.astype(np.float32), ERR), (tk[None], ERR), ("abc", ERR), (None, ERR), (tk[:-1], ERR),
                   (tuple(toks), toks), (tk, toks), (tk.astype(np.int32), toks)],
        "keys": array_kinds(kd, data.draw) + [("odd d", kd[..., :-1], ERR), ("L - 1", kd[:, :, 1:], ERR),
                                               ("rank 2", kd[0, 0], ERR), ("extra axis", kd[None], ERR)],
        "values": array_kinds(vd, data.draw) + [("L - 1", vd[:, :, 1:], ERR), ("layers 1 vs 2", vd[:1], ERR),
                                                 ("rank 2", vd[0, 0], ERR)],
        "key": [("doc", ERR), (["doc"], ERR), (([1], 2), ERR), (("doc",), REF)],
        "replace": [("no", ERR), (1, ERR), (None, ERR), (np.bool_(False), False)],
    }[arg]
    check(run, arg, kinds, ref_call=lambda x: run(x, "reference"))


@pytest.mark.parametrize("arg", ["request", "q", "k", "v", "layer"])
@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=2), data=st.data())
def test_document_store_attention(arg, mode, backend, s, data):
    store, docs, req, q, kt, vt = lazy_setup(s, backend)
    q = q[:, -1] if mode == "decode" else q
    fn = store.decode_attention if mode == "decode" else store.prefill_attention
    base = dict(request=req, q=q, k=kt, v=vt, layer=1)
    kmat, vmat = store.materialize(req, 1)
    kfull, vfull = np.concatenate([kmat, kt], 1), np.concatenate([vmat, vt], 1)
    if mode == "decode":                                  # the documents and the tail, all visible
        np.testing.assert_allclose(fn(**base), full(q, kfull, vfull), atol=1e-5)
    ref_store, _, ref_req, *_ = lazy_setup(s, "reference")
    ref_fn = getattr(ref_store, fn.__name__)

    def run(x, f=fn, r=req):
        kw = {**base, "request": r, arg: x}
        return f(kw["request"], kw["q"], kw["k"], kw["v"], layer=kw["layer"])

    other = DocumentStore(LazyConfig(block=4, theta=1e4), backend=backend).request([])
    qk = attention_kinds(q, kt, vt, data.draw)
    kinds = {
        "request": [(None, ERR), ("req", ERR), (req.table, ERR), (other, ERR)],
        "q": qk["q"] + ([("(Hq, d) in prefill", q[:, 0], ERR)] if mode == "prefill" else []),
        "k": qk["k"],
        # the tail's dv must be the stored documents' dv (free in plain attention)
        "v": [(lab, val, ERR if lab == "dv - 1" else e) for lab, val, e in qk["v"]],
        "layer": int_kinds(1) + [(2, ERR)],
    }[arg]
    check(run, arg, kinds, ref_call=lambda x: run(x, ref_fn, ref_req))


@pytest.mark.parametrize("backend", BACKENDS)
@SWEEP
@given(s=sizes(n_min=2))
def test_document_store_request_and_materialize(backend, s):
    store, docs, req, *_ = lazy_setup(s, backend)
    check(lambda x: store.request([docs[0][0]], start=x).question_start, "start", int_kinds(2))
    check(lambda x: store.request([docs[0][0]], positioned=x).rotations, "positioned",
          [("no", "no", ERR), ("1", 1, ERR), ("np.bool_", np.bool_(True), True)])
    check(lambda x: store.request(x), "documents", [("None", None, ERR), ("1.5", [[1.5]], ERR),
                                                    ("2-D", [np.zeros((2, 2), np.int64)], ERR)], names=["documents", "tokens"])
    with pytest.raises(KeyError, match=r"documents\[1\]"):        # a missing document is a lookup miss
        store.request([docs[0][0], [999]])
    check(lambda x: store.materialize(req, layer=x), "layer", int_kinds(1) + [(2, ERR)])


# ---- configs ---------------------------------------------------------------------------------------------

CONFIG_FIELDS = {
    WaveConfig: {"n_sink": 0, "n_local": 0, "tokens_per_cluster": 1, "segment_tokens": 1, "kmeans_iters": 1,
                 "update_every": 1, "update_clusters": 1, "retrieval_clusters": 0, "estimation_clusters": 0},
    GraphConfig: {"n_sink": 0, "n_recent": 0, "top_k": 1, "n_query_neighbors": 2, "max_degree": 1, "pool_cap": 1,
                  "search_L": 1, "build_queries": 1},
    StreamingConfig: {"n_sink": 0, "n_recent": 0},
    TopKConfig: {"n_sink": 0, "n_recent": 0, "top_k": 1},
    IVFConfig: {"n_sink": 0, "n_recent": 0, "top_k": 1, "n_lists": 1, "nprobe": 1, "iters": 1},
    QuestConfig: {"n_sink": 0, "n_recent": 0, "page_size": 1, "top_k": 1},
    LazyConfig: {"block": 1, "capacity_tokens": 16},
}
OPTIONAL = {"retrieval_clusters", "estimation_clusters", "build_queries", "n_lists", "nprobe", "capacity_tokens"}
FRACTIONS = {WaveConfig: ["retrieval_budget", "estimation_budget"], IVFConfig: ["probe_fraction"]}


@pytest.mark.parametrize("cls", list(CONFIG_FIELDS), ids=lambda c: c.__name__)
def test_config_fields(cls):
    """Int fields refuse bools, floats, strings and values below their minimum, accept NumPy ints;
    fractions refuse bools, ints (WaveConfig), NaN and values outside [0, 1], accept NumPy floats."""
    for name, lo in CONFIG_FIELDS[cls].items():
        good = max(lo, 1) if name not in ("block",) else 16
        check(lambda x: cls(**{name: x}), name, int_kinds(good, lo, name in OPTIONAL))
    for name in FRACTIONS.get(cls, []):
        kinds = [(True, ERR), ("0.5", ERR), (float("nan"), ERR), (1.5, ERR), (-0.1, ERR), (None, ERR),
                 (np.float32(0.5), 0.5)] + ([(1, ERR), (np.int64(0), ERR)] if cls is WaveConfig else [])
        check(lambda x: cls(**{name: x}), name, kinds)
    if cls in (WaveConfig, LazyConfig):
        field = "scale" if cls is WaveConfig else "theta"
        kinds = [(True, ERR), ("2", ERR), (float("nan"), ERR), (-1.0, ERR)] + [(np.float32(2e4), 2e4)]
        check(lambda x: cls(**{field: x}), field, kinds)
    if cls is QuestConfig:
        check(lambda x: cls(page_size=16, token_budget=x), "token_budget",
              [("8", 8, ERR), ("True", True, ERR), ("16.0", 16.0, ERR), ("np.int64(32)", np.int64(32), 32)])


# ---- flags -------------------------------------------------------------------------------------------------

def test_flags_must_be_bools(rng):
    """A flag given a string or a number must not act as its truth value (``causal="no"`` acted as True)."""
    q = rng.standard_normal((4, 4)).astype(np.float32)
    k = rng.standard_normal((2, 30, 4)).astype(np.float32)
    check(lambda x: rk.full_attention(q, k, k, check_finite=x), "check_finite", [("no", ERR), (np.bool_(True), True)])
    check(lambda x: WaveConfig(estimation=x), "estimation", [("no", ERR), (1, ERR), (np.bool_(False), False)])
    check(lambda x: GraphConfig(enhance=x), "enhance", [("no", ERR), (1, ERR)])
    check(lambda x: GraphConfig(metric=x), "metric", [(None, ERR), (["ip"], ERR), ("IP", ERR)])


@pytest.mark.parametrize("method", ["wave", "topk", "full"])
def test_index_flags_must_be_bools(method, rng):
    q = rng.standard_normal((4, 4)).astype(np.float32)
    k = rng.standard_normal((2, 30, 4)).astype(np.float32)
    idx = build(method, k, k)
    with pytest.raises(TypeError, match="return_lse"):
        idx.attend(q, return_lse="no")


def test_graph_config_accepts_numpy_bool():
    assert GraphConfig(enhance=np.bool_(False)) == GraphConfig(enhance=False)
