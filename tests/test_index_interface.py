"""The architecture holds: one decode-index interface, one registry, twins that export the same names,
layers that import only downwards, and indexes that own their KV."""
from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil

import numpy as np
import pytest

import retrokv
from retrokv import methods
from retrokv.index import DecodeIndex, IndexStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"wave": {"n_sink": 2, "n_local": 4, "tokens_per_cluster": 4, "segment_tokens": 64, "min_index_tokens": 0},
         "graph": {"n_sink": 2, "n_recent": 4, "top_k": 5, "n_query_neighbors": 4, "max_degree": 4,
                   "pool_cap": 16, "search_L": 8},
         "topk": {"n_sink": 2, "n_recent": 4, "top_k": 5}, "ivf": {"n_sink": 2, "n_recent": 4, "top_k": 5},
         "quest": {"n_sink": 2, "n_recent": 4, "top_k": 5, "page_size": 4, "token_budget": 8},
         "streaming": {"n_sink": 2, "n_recent": 6}, "full": {}}


def _kvq(rng, hkv=2, g=2, n=40, d=8, dv=6):
    k = rng.standard_normal((hkv, n, d)).astype(np.float32)
    v = rng.standard_normal((hkv, n, dv)).astype(np.float32)
    q = rng.standard_normal((hkv * g, n, d)).astype(np.float32)
    return k, v, q


def _build(name, k, v, q, backend="reference"):
    cfg = methods.get(name).config_class(**SMALL[name])
    return methods.build(name, k, v, q, config=cfg, backend=backend)


# ---------------------------------------------------------------------------------------------- interface
@pytest.mark.parametrize("name", methods.names())
def test_every_registered_index_satisfies_the_interface(name, rng):
    spec = methods.get(name)
    cls = spec.index_class
    sig = inspect.signature(cls.build)
    params = list(sig.parameters.values())
    assert [p.name for p in params[:3]] == ["keys", "values", "prefill_queries"]
    for kw in ("config", "backend", "device"):
        assert sig.parameters[kw].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(cls.attend).parameters)[:3] == ["self", "q", "return_lse"]
    assert list(inspect.signature(cls.append).parameters)[:3] == ["self", "k", "v"]

    k, v, q = _kvq(rng)
    idx = _build(name, k[:, :30], v[:, :30], q[:, :30])
    assert isinstance(idx, DecodeIndex) and isinstance(idx.config, spec.config_class)
    assert idx.n_tokens == 30 and idx.last_stats is None
    idx.append(k[:, 30], v[:, 30])                     # one token: (Hkv, d)
    idx.append(k[:, 31:35], v[:, 31:35])               # several: (Hkv, n, d)
    assert idx.n_tokens == 35
    out, lse = idx.attend(q[:, 35], return_lse=True)
    assert out.shape == (4, 6) and lse.shape == (4,) and np.isfinite(out).all()
    st = idx.last_stats
    assert type(st) is IndexStats or isinstance(st, IndexStats)
    assert st.n_tokens == 35 and 0 < st.density <= 1
    assert st.tokens_attended == pytest.approx(st.density * 4 * 35)
    assert st.bytes_read >= 4 * (8 + 6) * st.tokens_attended / 2   # at least the K and V of one group's reads
    assert set(st.scalars()) >= {"density", "keys_scored", "meta_scored", "tokens_attended", "bytes_read"}


def test_registry_is_the_one_method_list():
    from retrokv import hf
    from retrokv.harness import cli

    assert methods.names() == ("full", "streaming", "topk", "quest", "ivf", "wave", "graph")
    assert hf.METHODS == methods.names()
    assert cli.METHODS == ("plain",) + methods.names()
    with pytest.raises(ValueError, match="method must be one of"):
        methods.get("flash")
    with pytest.raises(TypeError, match="takes a WaveConfig config, got GraphConfig"):
        methods.build("wave", np.zeros((1, 4, 2), np.float32), np.zeros((1, 4, 2), np.float32),
                      config=retrokv.GraphConfig())


def test_default_config_gives_streaming_the_wave_budget():
    cfg = methods.default_config("streaming", 8192)
    assert (cfg.n_sink, cfg.n_recent) == (4, 64 + 148)
    assert methods.default_config("wave", 8192) == retrokv.WaveConfig()


def test_graph_needs_prefill_queries(rng):
    k, v, _ = _kvq(rng)
    with pytest.raises(TypeError, match="needs prefill_queries"):
        retrokv.GraphIndex.build(k, v)


# ---------------------------------------------------------------------------------------------- defects
def test_dense_bytes_read_counts_the_value_dim(rng):
    k, v, q = _kvq(rng, d=8, dv=6)
    idx = _build("full", k, v, q)
    idx.attend(q[:, -1])
    assert idx.last_stats.bytes_read == 4 * 2 * 40 * (8 + 6)      # Hkv * N * (d + dv) float32, not 2 d


@pytest.mark.parametrize("name", ["topk", "ivf", "quest", "graph", "streaming", "wave", "full"])
@pytest.mark.parametrize("hkv", [1, 2])
def test_indexes_own_their_kv(name, hkv, rng):
    """Overwriting the arrays passed to build must not change what attend returns (any Hkv)."""
    k, v, q = _kvq(rng, hkv=hkv)
    idx = _build(name, k, v, q)
    before = idx.attend(q[:, -1])
    k[:] = 0.0
    v[:] = 1e3
    np.testing.assert_array_equal(idx.attend(q[:, -1]), before)


@pytest.mark.parametrize("name, setting", [("graph", {"L": 40}), ("ivf", {"nprobe": 1}), ("quest", {"n_pages": 1})])
def test_per_call_search_settings_do_not_change_the_index(name, setting, rng):
    k, v, q = _kvq(rng)
    idx = _build(name, k, v, q)
    default = idx.search(q[:, -1], 5)
    other = idx.search(q[:, -1], 5, **setting)
    again = idx.search(q[:, -1], 5)
    np.testing.assert_array_equal(default[0], again[0])
    np.testing.assert_array_equal(default[1], again[1])
    assert not (np.array_equal(default[0], other[0]) and np.array_equal(default[1], other[1]))


# ---------------------------------------------------------------------------------------------- twins
def _twin_modules():
    names = sorted(m.name for m in pkgutil.iter_modules([os.path.join(ROOT, "reference")]) if not m.name.startswith("_"))
    assert names == sorted(m.name for m in pkgutil.iter_modules([os.path.join(ROOT, "fast")])
                           if not m.name.startswith("_") and m.name != "cuda")
    return names


@pytest.mark.parametrize("name", _twin_modules())
def test_reference_and_fast_export_the_same_names_and_signatures(name):
    ref = importlib.import_module(f"retrokv.reference.{name}")
    fast = importlib.import_module(f"retrokv.fast.{name}")
    assert sorted(ref.__all__) == sorted(fast.__all__)
    for mod in (ref, fast):
        missing = [x for x in mod.__all__ if not hasattr(mod, x)]
        assert not missing, f"{mod.__name__}.__all__ names missing attributes {missing}"
    for x in ref.__all__:
        a, b = getattr(ref, x), getattr(fast, x)
        if inspect.isfunction(a):
            pa = [(p.name, p.kind) for p in inspect.signature(a).parameters.values()]
            pb = [(p.name, p.kind) for p in inspect.signature(b).parameters.values()]
            assert pa == pb, f"{name}.{x}: reference {pa} vs fast {pb}"


def test_star_imports_resolve():
    for pkg in ("retrokv.reference", "retrokv.fast"):
        for name in _twin_modules():
            exec(f"from {pkg}.{name} import *", {})


# ---------------------------------------------------------------------------------------------- layers
LAYERS = {  # a module may import only from its own layer or lower ones
    "core": 0, "methods": 1, "hf": 2, "harness": 3, "testing": 3,
}


def _layer(module):
    parts = module.split(".")
    if parts[0] != "retrokv" or len(parts) == 1:
        return None
    head = parts[1]
    if head in ("methods", "hf", "harness", "testing"):
        return LAYERS[head]
    return LAYERS["core"]


def _imports(path, package):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
                yield from names
            elif node.module:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_layers_import_only_downwards():
    back = []
    for folder, package in (("retrokv", "retrokv"), ("retrokv/harness", "retrokv.harness"),
                            ("reference", "retrokv.reference"), ("fast", "retrokv.fast")):
        for f in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not f.endswith(".py"):
                continue
            me = package if f == "__init__.py" else f"{package}.{f[:-3]}"
            mine = _layer(me)
            for target in _imports(os.path.join(ROOT, folder, f), package if f == "__init__.py" else package):
                t = _layer(target)
                if t is not None and mine is not None and t > mine:
                    back.append(f"{me} -> {target}")
    assert not back, "imports against the layering: " + ", ".join(back)


@pytest.mark.parametrize("name", methods.names())
def test_a_config_passed_positionally_is_refused_not_ignored(name, rng):
    k, v, _ = _kvq(rng)
    cfg = methods.get(name).config_class(**SMALL[name])
    with pytest.raises(TypeError, match="pass the config by keyword"):
        methods.get(name).index_class.build(k, v, cfg)
