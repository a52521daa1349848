"""The frontier's x axis (byte density), its sweep loop, the held-out corpus and the wave index's
short-context threshold and retrieval floor (issue 16)."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest

from retrokv import methods
from retrokv.harness import data as D
from retrokv.harness import frontier as F
from retrokv.reference.attention import full_attention
from retrokv.wave_index import WaveConfig, WaveIndex


def _qkv(hq=4, hkv=2, n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((hq, n, d)).astype(np.float32)
    k = rng.standard_normal((hkv, n, d)).astype(np.float32)
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    return q, k, v


def _density(index, q, k, v):
    index.attend(q)
    st = index.last_stats
    return F.byte_density(st, F.head_unit(index, k.shape[0], q.shape[0]), st.n_tokens, k.shape[2], v.shape[2])


def test_dense_attention_reads_the_whole_kv_once():
    q, k, v = _qkv()
    assert _density(methods.build("full", k, v), q[:, -1], k, v) == pytest.approx(1.0, abs=1e-12)


def test_streaming_byte_density_is_its_window_fraction():
    q, k, v = _qkv()
    from retrokv.baselines import StreamingConfig

    ix = methods.build("streaming", k, v, config=StreamingConfig(n_sink=4, n_recent=56))
    assert _density(ix, q[:, -1], k, v) == pytest.approx(60 / 600)


def test_wave_byte_density_counts_metadata():
    q, k, v = _qkv()
    ix = methods.build("wave", k, v, config=WaveConfig(min_index_tokens=0))
    bd = _density(ix, q[:, -1], k, v)
    st = ix.last_stats
    hkv, n, d = k.shape
    # exact tokens alone, per KV head, would give st.density; centroids (C d per head) and the
    # estimated clusters' value sums come on top
    meta = ix.n_clusters * d / (n * (d + v.shape[2]))
    assert bd >= st.density + meta - 1e-9
    assert bd < 1.0
    # the accounting: exact K and V, every centroid, the estimated value sums, 8-byte sizes; the ball-bound
    # ranking reads one 4-byte radius per cluster more
    ball = methods.build("wave", k, v, config=WaveConfig(min_index_tokens=0, radius_weight=0.5))
    ball.attend(q[:, -1])
    g, dv, c = q.shape[0] // hkv, v.shape[2], ix.n_clusters
    for s, radius in ((st, 0), (ball.last_stats, 1)):
        exact, e = s.tokens_attended // g, s.estimation_clusters.shape[1]
        assert s.bytes_read == 4 * (exact * (d + dv) + hkv * c * (d + radius) + hkv * e * dv) + 8 * hkv * c


def test_byte_density_checks_its_arguments():
    st = types.SimpleNamespace(bytes_read=10)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            F.byte_density(st, bad, 10, 4, 4)


def test_sweep_points_are_increasing_and_distinct():
    for m in F.METHODS:
        vals = [v for _, v in F.sweep(m, 4096)]
        assert vals == sorted(vals) and len(set(vals)) == len(vals) >= 5
    with pytest.raises(ValueError):
        F.sweep("nope", 4096)


def test_run_point_matches_layer_errors():
    """The frontier's loop measures exactly what eval.layer_errors measures (same positions, same error)."""
    from retrokv.harness.eval import layer_errors

    q, k, v = _qkv(n=400)
    c = types.SimpleNamespace(q=q, k=k, v=v)
    cfg = WaveConfig(min_index_tokens=0, retrieval_budget=0.1)
    want = layer_errors({0: c}, "wave", cfg, "reference", n_queries=8)[0]
    ix = methods.build("wave", k[:, :392], v[:, :392], config=cfg, backend="reference")
    err, bd, td = F.run_point(ix, c, F.reference_outputs(c, 8), 8)
    assert err == pytest.approx(want["error"], rel=1e-9)
    assert td == pytest.approx(want["density"], rel=1e-9)


def test_at_sets_the_knob_on_a_copy():
    q, k, v = _qkv(n=400)
    built = F._build("wave", k, v, q, "reference", 400)
    a = F._at("wave", built, 0.3)
    assert a is not built and a.config.retrieval_budget == 0.3 and built.config.retrieval_budget == 0.018
    a.append(k[:, -1], v[:, -1])
    assert built.n_tokens == 400 and a.n_tokens == 401
    # the wave variants share one build: each copy takes its own decode fields, whichever variant built it
    b = F._at("wave_maxlogit", built, 0.08)
    assert (b.config.group_rank, b.config.estimation, b.config.retrieval_budget) == ("max_logit", True, 0.08)
    for m, want in (("wave", ("softmax_sum", True)), ("wave_noest", ("softmax_sum", False))):
        c = F._at(m, b, 0.08)
        assert (c.config.group_rank, c.config.estimation) == want
    # wave_mix_u64 differs from wave_mix only in its index update: 64 tokens -> 4 clusters (16 per cluster)
    clustered = methods.build("wave", k, v, config=WaveConfig(min_index_tokens=0), backend="reference")
    u, mix = F._at("wave_mix_u64", clustered, 0.04), F._at("wave_mix", F._at("wave_mix_u64", clustered, 0.04), 0.04)
    assert (u.config.update_every, u.config.update_clusters) == (64, 4)
    assert (mix.config.update_every, mix.config.update_clusters) == (1024, 64)
    assert dataclasses.replace(u.config, update_every=1024, update_clusters=64) == mix.config
    gen = np.random.default_rng(1)
    k2, v2 = (gen.standard_normal((k.shape[0], 128, k.shape[2])).astype(np.float32) for _ in range(2))
    assert clustered.n_clusters > 0 and u.append(k2, v2) == 8 and mix.append(k2, v2) == 0
    # a build field (keys per cluster) cannot be changed on a copy: the variant needs its own build
    with pytest.raises(ValueError, match="tokens_per_cluster"):
        F._at("wave_c4", clustered, 0.04)
    fine = methods.build("wave", k, v, config=WaveConfig(tokens_per_cluster=4, min_index_tokens=0), backend="reference")
    assert F._at("wave_c4_est50", fine, 0.04).config.estimation_budget == 0.5
    assert F._at("wave_c4", F._at("wave_c4_est50", fine, 0.04), 0.04).config.estimation_budget == 0.232


def test_at_widens_the_graph_beam_only_at_the_variants_layers():
    q, k, v = _qkv(n=400)
    built = F._build("graph", k, v, q, "reference", 400)
    layers, wide = F.WIDE_LAYERS["graph_l7"]
    at = {layer: F._at("graph_l7", built, 41, layer) for layer in (6, 7)}
    assert layers == {7} and at[7].config.search_L == wide and at[6].config.search_L == 150
    assert at[7].top_k == at[6].top_k == 41 and built.config.search_L != wide
    assert F._at("graph", built, 41, 7).config.search_L == 150          # the plain graph: one beam everywhere
    assert F.hf_config("graph_l7") == F.hf_config("graph")              # the same build: only the copies differ


def test_interp_error_is_nan_outside_the_sweep():
    rows = [{"method": "topk", "token_density": x, "error": e} for x, e in ((0.01, 0.4), (0.1, 0.1))]
    assert F.interp_error(rows, "topk", 0.1) == pytest.approx(0.1)
    assert 0.1 < F.interp_error(rows, "topk", 0.03) < 0.4
    assert np.isnan(F.interp_error(rows, "topk", 0.5))


# ------------------------------------------------------------------------------------ held-out corpus
class _Words:
    """A stand-in tokenizer: one id per 4 characters (real BPE on English: ~4.5)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [sum(map(ord, text[i:i + 4])) for i in range(0, len(text), 4)]}


def test_corpora_are_different_kinds_of_text():
    doc, law = D.natural_text(20_000, "pydoc"), D.natural_text(20_000, "licenses")
    assert len(doc) >= 20_000 and len(law) >= 20_000
    assert "license" in law.lower() and "warranty" in law.lower()
    assert doc[:2000] != law[:2000]
    assert D.natural_text(20_000) == doc                     # pydoc stays the default
    assert D.corpus_fingerprint("licenses") != D.corpus_fingerprint("pydoc")


def test_corpus_is_selectable_by_name_and_checked():
    tok = _Words()
    for corpus in D.CORPORA:
        ids = D.natural_text_ids(tok, 3000, corpus=corpus)
        assert len(ids) == 3000
    assert D.natural_text_ids(tok, 500, "licenses") != D.natural_text_ids(tok, 500, "pydoc")
    with pytest.raises(ValueError, match="corpus"):
        D.natural_text(1000, corpus="novels")
    with pytest.raises(ValueError, match="corpus"):
        D.natural_text_ids(tok, 100, corpus="novels")


def test_license_corpus_drops_near_duplicates():
    parts = D._license_parts()
    keys = [" ".join(" ".join(x for x in p.splitlines() if "copyright" not in x.lower()).split()[:60]).lower()
            for p in parts]
    assert len(set(keys)) == len(keys)


# ------------------------------------------------------------------------- short-context threshold
def _cfg(**kw):
    base = dict(n_sink=4, n_local=16, tokens_per_cluster=8, update_every=32, update_clusters=4,
                min_index_tokens=100)
    base.update(kw)
    return WaveConfig(**base)


def test_below_the_threshold_attention_is_exact_and_unclustered():
    q, k, v = _qkv(n=300)
    cfg = _cfg()
    ix = WaveIndex.build(k[:, :60], v[:, :60], config=cfg, backend="reference")
    assert ix.n_clusters == 0
    for t in range(60, 121):                  # contexts of up to 4 + 16 + 100 tokens: dense, exact
        np.testing.assert_allclose(ix.attend(q[:, t]), full_attention(q[:, t], k[:, :t], v[:, :t]), atol=1e-5)
        assert ix.last_stats.density == 1.0 and ix.n_clusters == 0
        ix.append(k[:, t], v[:, t])
    assert ix.n_tokens == 121 and ix.n_clusters > 0     # past the threshold the update path clusters


def test_above_the_threshold_the_prompt_is_clustered():
    _, k, v = _qkv(n=300)
    assert WaveIndex.build(k[:, :121], v[:, :121], config=_cfg(), backend="reference").n_clusters > 0
    assert WaveIndex.build(k[:, :121], v[:, :121], config=_cfg(min_index_tokens=0),
                           backend="reference").n_clusters > 0


def test_default_threshold_is_the_offload_modes():
    cfg = WaveConfig()
    assert cfg.min_index_tokens == 1024 and cfg.n_sink + cfg.n_local + cfg.min_index_tokens == 1092
    _, k, v = _qkv(n=1092 + 16)
    assert WaveIndex.build(k[:, :1092], v[:, :1092], backend="reference").n_clusters == 0
    assert WaveIndex.build(k[:, :1093 + 15], v[:, :1093 + 15], backend="reference").n_clusters > 0


def test_retrieval_floor():
    assert WaveConfig().n_retrieve(256) == 4                                   # 1.8% of 256, the fraction alone
    assert WaveConfig(min_retrieval_tokens=100).n_retrieve(256) == 7           # ceil(100 / 16)
    assert WaveConfig(min_retrieval_tokens=10_000).n_retrieve(256) == 256      # capped at the clusters
    assert WaveConfig(min_retrieval_tokens=100, retrieval_budget=0.5).n_retrieve(256) == 128
    with pytest.raises(ValueError):
        WaveConfig(min_retrieval_tokens=-1)
    with pytest.raises(ValueError):
        WaveConfig(min_index_tokens=True)
    _, k, v = _qkv(n=2000)
    q = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    ix = WaveIndex.build(k, v, config=WaveConfig(min_retrieval_tokens=200), backend="reference")
    ix.attend(q)
    assert ix.last_stats.retrieval_clusters.shape[1] == 13 and ix.n_estimate + 13 <= ix.n_clusters


# ------------------------------------------------------------------------------------------ report
def _db():
    pts = []
    for corpus in ("pydoc", "licenses"):
        for layer in (1, 5):
            for m, xs in (("topk", (0.02, 0.05, 0.2)), ("wave", (0.03, 0.1)), ("streaming", (0.01, 0.1)),
                          ("graph", (0.02, 0.1)), ("wave_maxlogit", (0.03, 0.1))):
                if m == "graph" and layer == 1:
                    continue
                for x in xs:
                    pts.append({"method": m, "knob": f"x={x}", "value": x, "layer": layer, "corpus": corpus,
                                "n_tokens": 4096, "error": 0.01 / x * {"wave": 2, "wave_maxlogit": 0.5}.get(m, 1),
                                "byte_density": x + (0.5 if m == "topk" else 0.02), "token_density": x})
    return {"points": pts, "runs": [{"start": "s", "end": "e", "load": 5.0, "load_end": 6.0, "fingerprints": {}}]}


def test_report_says_missed_when_wave_is_worse_and_plots(tmp_path):
    md = F.report(_db(), "cmd", (1, 5), (5,))
    assert "**wave, pydoc, 4096 tokens**: below oracle at 0 of 2 points (MISSED)" in md
    assert "**wave_maxlogit, licenses, 4096 tokens**: below oracle at 2 of 2 points (MET)" in md
    assert "Graph measured on layers [5]" in md and "`cmd`" in md and "kvpress" in md
    path = F.plot(_db(), str(tmp_path / "f.png"), (1, 5))
    assert (tmp_path / "f.png").stat().st_size > 10_000 and path.endswith("f.png")


def test_cli_refuses_bad_frontier_layers(tmp_path, capsys):
    from retrokv.harness.cli import main

    assert main(["eval", "--frontier", "--frontier-layers", "5,99", "--out", str(tmp_path)]) == 2
    assert "frontier-layers" in capsys.readouterr().err


# ------------------------------------------------------------- task frontiers (needle accuracy, perplexity)
def test_run_density_averages_byte_density_over_layers_and_steps():
    ix = types.SimpleNamespace()                   # not a SparseIndex: counted in KV heads
    h = types.SimpleNamespace(indexes={0: [ix], 1: [ix]}, stats={
        0: [{"bytes_read": 2 * 100 * 4 * 32, "n_tokens": 100, "density": 1.0}],
        1: [{"bytes_read": 2 * 100 * 4 * 32 // 4, "n_tokens": 100, "density": 0.25},
            {"bytes_read": 2 * 200 * 4 * 32 // 2, "n_tokens": 200, "density": 0.5}]})
    bd, td = F.run_density(h, hq=6, hkv=2, d=16, dv=16)
    assert bd == pytest.approx((1 + 0.25 + 0.5) / 3) and td == pytest.approx((1 + 0.25 + 0.5) / 3)
    assert all(np.isnan(F.run_density(types.SimpleNamespace(indexes={}, stats={}), 6, 2, 16, 16)))


def test_needle_rows_compare_with_full_on_the_same_prompts():
    res = [{"prompt": p, "method": "full", "knob": "dense", "value": None, "correct": p != 3, "answer_nll": 0.1,
            "byte_density": 1.0, "token_density": 1.0} for p in range(4)]
    res += [{"prompt": p, "method": "wave", "knob": "r=0.018", "value": 0.018, "correct": p in (0, 1),
             "answer_nll": 0.5, "byte_density": 0.06 + 0.01 * p, "token_density": 0.03} for p in range(3)]
    rows = {r["method"]: r for r in F.needle_rows(res)}
    w = rows["wave"]
    assert w["prompts"] == 3 and w["accuracy"] == pytest.approx(2 / 3)
    assert w["full_accuracy"] == pytest.approx(1.0)          # prompts 0-2 only: full got all three
    assert w["delta_points"] == pytest.approx(-100 / 3) and w["byte_density"] == pytest.approx(0.07)
    assert rows["full"]["accuracy"] == pytest.approx(0.75)


def _frontier_tasks():
    """benchmarks/frontier_tasks.py as a module (a script, not part of the package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "frontier_tasks.py")
    spec = importlib.util.spec_from_file_location("frontier_tasks", path)
    T = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(T)
    return T


def test_task_groups_share_a_build_only_between_equal_build_fields():
    T = _frontier_tasks()
    table = {m: [("a", 0.1)] for m in ("wave", "wave_c4", "wave_mix", "wave_c4_est50", "graph")}
    groups = T._groups(["wave_c4", "wave", "wave_mix", "wave_c4_est50", "graph"], table)
    assert [(m, [p[0] for p in pts]) for m, pts in groups] == [
        ("wave_c4", ["wave_c4", "wave_c4_est50"]), ("wave", ["wave", "wave_mix"]), ("graph", ["graph"])]
    with pytest.raises(SystemExit, match="wave_noest"):
        T._groups(["wave_noest"], table)


def test_needle_stage_refuses_to_resume_on_other_prompt_ids():
    """benchmarks/frontier_tasks.py records each prompt's id hash; other ids (a changed environment's
    licenses haystack) must stop the run instead of mixing two haystacks in one table."""
    T = _frontier_tasks()
    db = {"needle": {}}
    T._check_prompt(db, 8192, 0, [1, 2, 3])
    T._check_prompt(db, 8192, 0, [1, 2, 3])                  # the same ids: resumes
    T._check_prompt(db, 8192, 1, [1, 2, 4])                  # another prompt has its own hash
    assert set(db["prompt_sha"]) == {"8192|0", "8192|1"}
    with pytest.raises(SystemExit, match="prompt 0"):
        T._check_prompt(db, 8192, 0, [1, 2, 4])
    with pytest.raises(SystemExit):
        T._check_prompt(db, 8192, 1, [1, 2, 4, 5])


def test_ppl_rows_and_lowest_matching():
    res = [{"corpus": "pydoc", "method": "full", "knob": "dense", "value": None, "ppl": 2.0, "byte_density": 1.0,
            "token_density": 1.0},
           {"corpus": "pydoc", "method": "wave", "knob": "a", "value": 0.1, "ppl": 2.03, "byte_density": 0.08,
            "token_density": 0.05},
           {"corpus": "pydoc", "method": "wave", "knob": "b", "value": 0.2, "ppl": 2.02, "byte_density": 0.12,
            "token_density": 0.1},
           {"corpus": "pydoc", "method": "wave", "knob": "c", "value": 0.01, "ppl": 2.2, "byte_density": 0.05,
            "token_density": 0.02},
           {"corpus": "licenses", "method": "wave", "knob": "a", "value": 0.1, "ppl": 3.0, "byte_density": 0.08,
            "token_density": 0.05}]
    rows = F.ppl_rows(res)
    d = {(r["corpus"], r["knob"]): r["delta_pct"] for r in rows}
    assert d[("pydoc", "a")] == pytest.approx(1.5) and d[("pydoc", "c")] == pytest.approx(10.0)
    assert np.isnan(d[("licenses", "a")])                    # no full row for that corpus
    best = F.lowest_matching([r for r in rows if r["corpus"] == "pydoc"], lambda r: r["delta_pct"] <= 2)
    assert best["wave"]["knob"] == "a" and "full" not in best  # c misses, b is above 10%
    assert F.lowest_matching(rows, lambda r: r["delta_pct"] <= 2, below=0.05) == {}


@pytest.mark.model
def test_needle_prompt_draws_its_haystack_from_the_corpus(smollm2):
    from retrokv.harness import eval as E

    _, tok = smollm2
    p = F.needle_prompt(tok, 700, 0.4, 1, "pydoc", seed=5)
    assert p.prompt_ids == E.needle(tok, 700, 0.4, 1, "natural", 5).prompt_ids and p.task == "niah_pydoc"
    lic = F.needle_prompt(tok, 700, 0.4, 4, "licenses", seed=5)
    text = tok.decode(list(lic.prompt_ids))
    assert len(lic.prompt_ids) == 700 and lic.task == "mk4_licenses" and text.count("special magic numbers for") == 4
    assert "licen" in text.lower() and lic.prompt_ids != F.needle_prompt(tok, 700, 0.4, 4, "pydoc", 5).prompt_ids
    orig = D.natural_text_ids
    with pytest.raises(ValueError):
        F.needle_prompt(tok, 700, 0.4, 1, "nope")
    with pytest.raises(ValueError):
        F.needle_prompt(tok, 700, 0.4, 99, "licenses")         # eval.needle refuses: the patch is undone
    assert D.natural_text_ids is orig


@pytest.mark.model
def test_attached_points_decode_like_the_dense_model_and_copy_per_knob(smollm2):
    import torch

    from retrokv import hf
    from retrokv.harness import eval as E

    model, tok = smollm2
    ids = D.natural_text_ids(tok, 340, corpus="licenses")
    n, targets = 320, ids[320:]
    with torch.no_grad():
        logits = model(torch.as_tensor([ids])).logits[0].float()
    dense = -torch.log_softmax(logits[n - 1:-1], -1)[torch.arange(len(targets)), torch.as_tensor(targets)].numpy()
    logits0, saved, _ = E.shared_prefill(model, ids[:n], "fast")
    c = model.config
    shape = (c.num_attention_heads, c.num_key_value_heads, 64, 64)
    out = {}
    for method, pts in (("full", [("dense", None)]), ("topk", [("k=8", 8), ("k=400", 400), ("k=8 again", 8)])):
        for lab, _, h, cache in F.attached_points(model, saved, n, method, pts, "fast"):
            nll, hit = F.teacher_forced(model, cache, logits0, targets)
            out[lab] = (nll, F.run_density(h, *shape))
            assert all(len(s) == len(targets) - 1 for s in h.stats.values())   # stats reset per point
    assert getattr(model, hf._ATTACHED, None) is None                           # detached at the end
    np.testing.assert_allclose(out["dense"][0], dense, atol=2e-3)               # full via the index == dense
    np.testing.assert_allclose(out["k=400"][0], dense, atol=2e-3)               # k >= n: exact
    assert out["dense"][1][0] == pytest.approx(1.0)
    assert out["k=8"][1][0] < out["k=400"][1][0]
    np.testing.assert_allclose(out["k=8 again"][0], out["k=8"][0], atol=1e-6)   # fresh copy per knob
    assert not np.allclose(out["k=8"][0], dense, atol=2e-3)


def test_task_frontier_configs_give_the_paper_window_only_to_graph_paper(rng):
    """Every retrieval baseline of the task frontiers keeps the wave index's 4 + 64 static tokens; only the
    ``graph_paper`` variant keeps RetrievalAttention's 128 + 512, and its knob copy sets top-k and the beam."""
    from retrokv.graph_index import GraphConfig

    name, cfg = F.hf_config("graph_paper")
    assert name == "graph" and (cfg.n_sink, cfg.n_recent) == (GraphConfig().n_sink, GraphConfig().n_recent) == (128, 512)
    for m in ("graph", "topk", "quest", "ivf"):
        assert (F.hf_config(m)[1].n_sink, F.hf_config(m)[1].n_recent) == F.STATIC
    k = rng.standard_normal((1, 900, 8)).astype(np.float32)
    ix = methods.build("graph", k, k, k, config=GraphConfig(n_sink=4, n_recent=16), backend="fast")
    at = F._at("graph_paper", ix, 300)
    assert at.top_k == 300 and at.config.top_k == 300 and at.config.search_L >= 300 and ix.top_k != 300
