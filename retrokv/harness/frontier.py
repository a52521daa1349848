"""Accuracy against budget: one x axis (byte density) for every decode index, and the error frontier.

**Byte density** (:func:`byte_density`) is the one definition of "how much of the KV a decode step
read" used by every frontier in retrokv::

    byte_density = bytes_read / (H * N * 4 * (d + dv))

``bytes_read`` comes from the index's :attr:`last_stats` (:class:`retrokv.index.IndexStats`), so it
counts **metadata** as well as KV: the wave index's centroids, the estimated clusters' value sums
and the cluster sizes; IVF's centroids and every key scanned in the probed lists; Quest's page
min/max vectors; the exact top-k oracle's and the graph's scored keys. The denominator is the whole
float32 KV cache of the layer at this step (``N = stats.n_tokens``). ``H`` is the head unit in which
the index counts its reads: dense attention and the wave index count what a GQA group shares once
(``H = Hkv``); the retrieval indexes built on :class:`retrokv.sparse.SparseIndex` (StreamingLLM,
top-k, Quest, IVF, graph) count each query head's reads as its own copy (``H = Hq``; see
:mod:`retrokv.sparse`), which for them is the KV a group reads when its heads' sets are disjoint (an
upper bound) and exactly the shared read for StreamingLLM. With that unit, dense attention has byte
density 1.0, StreamingLLM its window fraction, and a method reading more metadata than KV can exceed 1
(the top-k oracle scores every key: its byte density is >= 0.5 whatever ``k``).

:func:`error_frontier` sweeps each method's budget knob on captured Q/K/V and reports, per point,
the median relative decode-attention error over layers (per layer the median over the last
``n_queries`` positions, exactly as :func:`retrokv.harness.eval.layer_errors` does) against the
median byte density and the mean exact-token density (``stats.density``).
"""
from __future__ import annotations

import copy
import dataclasses
import types

import numpy as np

__all__ = ["byte_density", "head_unit", "sweep", "layer_points", "aggregate", "error_frontier", "interp_error",
           "report", "plot", "METHODS", "needle_prompt", "hf_config", "attached_points", "run_density",
           "teacher_forced", "forced_answer", "needle_rows", "ppl_rows", "lowest_matching", "WAVE_VARIANTS",
           "WIDE_LAYERS", "wave_build_key"]

METHODS = ("streaming", "topk", "quest", "ivf", "wave", "wave_noest", "wave_maxlogit", "wave_ball", "wave_mix",
           "wave_c4", "wave_c4_est50", "graph")
# The wave index's variants, as WaveConfig fields on top of the defaults. Most are decode choices and share one
# build (the clusters); wave_c4* set a build field and get their own (wave_build_key).
# * wave_noest: RetroInfer's Fig. 19a ablation (no estimation zone).
# * wave_maxlogit: clusters ranked by the GQA group's best centroid score; wave_ball: by the group's best ball
#   bound (centroid score + 0.5 |q| radius); wave_mix: half of the retrieved clusters by each. Not in the paper.
# * wave_mix_u64: wave_mix with the index update (§4.2: tokens leaving the recent window are clustered, 16 per
#   cluster) every 64 tokens instead of 1024. The paper's segment is sized for long generations; over a short
#   one the steady window, read exactly at every step, would grow by the whole run.
# * wave_mix_noest: wave_mix without its estimation zone (the ablation, on the tasks).
# * wave_c4: 4 keys per cluster instead of ~16 (tokens_per_cluster); wave_c4_est50: also 50% of the clusters
#   estimated instead of 23.2%. The paper's ranking with its own knobs at other values, for the error target
#   (below the exact top-k oracle at equal exact budget), at a larger metadata read.
_MIX = {"group_rank": "max_logit", "radius_weight": 0.5, "ball_share": 0.5}
WAVE_VARIANTS = {"wave": {}, "wave_noest": {"estimation": False}, "wave_maxlogit": {"group_rank": "max_logit"},
                 "wave_ball": {"group_rank": "max_logit", "radius_weight": 0.5}, "wave_mix": _MIX,
                 "wave_mix_u64": dict(_MIX, update_every=64, update_clusters=4),
                 "wave_mix_noest": dict(_MIX, estimation=False),
                 "wave_c4": {"tokens_per_cluster": 4},
                 "wave_c4_est50": {"tokens_per_cluster": 4, "estimation_budget": 0.5}}
# graph_l7: the graph index with a 1000-entry candidate list at layer 7 alone (RetrievalAttention gives every layer
# one search_L). Layer 7 is where the graph's answer-step output error is furthest from the exact top-k's on the
# needle prompts it misses (benchmarks/results/graph_needle_recall.md); not in the paper. {variant: (layers, L)}
WIDE_LAYERS = {"graph_l7": (frozenset({7}), 1000)}
# the WaveConfig fields the build reads: variants that differ in one of them cannot share a build (wave_build_key)
BUILD_FIELDS = ("n_sink", "n_local", "tokens_per_cluster", "segment_tokens", "kmeans_iters", "min_index_tokens")
STATIC = (4, 64)            # the wave index's sinks + local window, given to every retrieval baseline


def byte_density(stats, hkv, n, d, dv):
    """``stats.bytes_read / (hkv * n * 4 * (d + dv))``: the fraction of the whole float32 KV that one
    decode step read, metadata included. ``hkv`` is the head unit the index counts in (see the module
    docstring and :func:`head_unit`); ``n`` the context length (``stats.n_tokens``)."""
    for name, x in (("hkv", hkv), ("n", n), ("d", d), ("dv", dv)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x <= 0:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    return float(stats.bytes_read) / float(hkv * n * 4 * (d + dv))


def head_unit(index, hkv, hq):
    """The head count ``index`` sums ``bytes_read`` over: ``hq`` for the SparseIndex family (each
    query head counted as its own reader), ``hkv`` for dense attention and the wave index."""
    from ..sparse import SparseIndex

    return hq if isinstance(index, SparseIndex) else hkv


def _geom(lo, hi, n):
    return sorted({int(round(x)) for x in np.geomspace(lo, hi, n)})


def sweep(method, n_tokens):
    """The budget points of ``method`` at ``n_tokens`` of context: a list of ``(knob label, value)``.

    Chosen so that the exact-token density spans ~1% to ~30% (metadata adds to the byte density)."""
    n = n_tokens
    s = STATIC[0] + STATIC[1]
    if method == "streaming":                     # total cache = n_sink + window
        return [(f"window={w}", w) for w in _geom(0.01 * n - 4, 0.30 * n - 4, 7)]
    if method in ("topk", "graph"):               # retrieved keys per head on top of the 4 + 64 static
        return [(f"k={k}", k) for k in _geom(max(8, 0.005 * n), 0.30 * n - s, 8)]
    if method == "quest":                         # tokens read from whole 16-token pages
        return [(f"budget={b}", b) for b in sorted({max(16, 16 * round(x / 16)) for x in
                                                     np.geomspace(0.005 * n, 0.30 * n - s, 7)})]
    if method == "ivf":                           # lists probed, of round(4 sqrt(n)); top_k = 100 (RA)
        return [(f"nprobe={p}", p) for p in (1, 2, 4, 8, 16, 32, 64, 128)]
    if method in WAVE_VARIANTS:                   # fraction of clusters retrieved exactly
        return [(f"r={r:g}", r) for r in (0.005, 0.01, 0.018, 0.04, 0.08, 0.15, 0.3)]
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _build(method, k, v, q, backend, n_tokens, value=None):
    """The index ``method`` over ``k, v`` (prefill queries ``q``), built once for the whole sweep
    (the knob is set per point by :func:`_at`) except StreamingLLM, whose window is structural."""
    from .. import methods
    from ..baselines import IVFConfig, QuestConfig, StreamingConfig, TopKConfig
    from ..graph_index import GraphConfig
    from ..wave_index import WaveConfig

    s0, s1 = STATIC
    if method == "streaming":
        return methods.build("streaming", k, v, config=StreamingConfig(n_sink=s0, n_recent=value), backend=backend)
    if method == "topk":
        return methods.build("topk", k, v, config=TopKConfig(n_sink=s0, n_recent=s1), backend=backend)
    if method == "quest":
        return methods.build("quest", k, v, config=QuestConfig(n_sink=s0, n_recent=s1), backend=backend)
    if method == "ivf":
        return methods.build("ivf", k, v, config=IVFConfig(n_sink=s0, n_recent=s1), backend=backend)
    if method in WAVE_VARIANTS:
        return methods.build("wave", k, v, config=WaveConfig(**WAVE_VARIANTS[method]), backend=backend)
    if method == "graph":
        return methods.build("graph", k, v, q, config=GraphConfig(n_sink=s0, n_recent=s1), backend=backend)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def wave_build_key(method):
    """The build fields ``method`` (a wave variant) sets, as a hashable key: variants with equal keys share one
    build (each copy then takes its own decode fields, :func:`_at`)."""
    if method not in WAVE_VARIANTS:
        raise ValueError(f"method must be one of the wave variants {tuple(WAVE_VARIANTS)}, got {method!r}")
    return tuple((f, WAVE_VARIANTS[method][f]) for f in BUILD_FIELDS if f in WAVE_VARIANTS[method])


def _at(method, index, value, layer=None):
    """A copy of the built ``index`` with its budget knob at ``value`` (decode appends mutate it); ``layer``
    (the model layer the index serves) matters to the per-layer variants (``WIDE_LAYERS``)."""
    import types

    memo = {id(x): x for x in vars(index).values() if isinstance(x, types.ModuleType)}   # shared, not copied
    ix = copy.deepcopy(index, memo)
    if method in ("topk", "graph", "graph_paper") or method in WIDE_LAYERS:
        ix.top_k = int(value)
        if method != "topk":                      # the beam must hold at least the k it returns
            wide = WIDE_LAYERS[method][1] if method in WIDE_LAYERS and layer in WIDE_LAYERS[method][0] else 150
            ix.config = dataclasses.replace(ix.config, top_k=int(value), search_L=max(wide, int(value) + 50))
    elif method == "quest":
        ix.n_pages = max(1, int(value) // ix.config.page_size)
    elif method == "ivf":
        ix.nprobe = min(ix.n_lists, int(value))
    elif method in WAVE_VARIANTS:                 # the variant's decode choices on a shared build
        default = {f.name: f.default for f in dataclasses.fields(ix.config)}
        # the build fields some variant sets must be this variant's (or the default); the others are the caller's
        varied = [f for f in BUILD_FIELDS if any(f in v for v in WAVE_VARIANTS.values())]
        want = {f: WAVE_VARIANTS[method].get(f, default[f]) for f in varied}
        have = {f: getattr(ix.config, f) for f in varied}
        if want != have:
            raise ValueError(f"{method} needs an index built with {want}; this one was built with {have}")
        fields = {k: default[k] for v in WAVE_VARIANTS.values() for k in v if k not in BUILD_FIELDS}  # reset
        fields.update((k, x) for k, x in WAVE_VARIANTS[method].items() if k not in BUILD_FIELDS)
        ix.config = dataclasses.replace(ix.config, retrieval_budget=float(value), **fields)
    return ix


def reference_outputs(layer_qkv, n_queries=16):
    """Full attention (float64) of each of the last ``n_queries`` queries over its causal prefix."""
    from ..reference.attention import full_attention

    q, k, v = layer_qkv.q, layer_qkv.k, layer_qkv.v
    n = k.shape[1]
    return [full_attention(q[:, t].astype(np.float64), k[:, :t].astype(np.float64), v[:, :t].astype(np.float64))
            for t in range(n - n_queries, n)]


def run_point(index, layer_qkv, refs, n_queries=16):
    """Decode the last ``n_queries`` positions through ``index`` (built on the keys before them),
    appending the keys in between as :func:`retrokv.harness.eval.layer_errors` does. Returns
    ``(median relative error, median byte density, mean token density)``."""
    q, k, v = layer_qkv.q, layer_qkv.k, layer_qkv.v
    hq, n, d = q.shape
    hkv, dv = k.shape[0], v.shape[2]
    p = n - n_queries
    errs, bdens, tdens = [], [], []
    unit = head_unit(index, hkv, hq)
    for i, t in enumerate(range(p, n)):
        if t > p:
            index.append(k[:, t - 1], v[:, t - 1])
        o_hat = index.attend(q[:, t])
        o = refs[i]
        errs.append(float(np.linalg.norm(o - o_hat) / np.linalg.norm(o)))
        st = index.last_stats
        bdens.append(byte_density(st, unit, int(st.n_tokens), d, dv))
        tdens.append(float(st.density))
    return float(np.median(errs)), float(np.median(bdens)), float(np.mean(tdens))


def layer_points(layer_qkv, methods=METHODS, n_queries=16, backend="fast", layer=None):
    """Every sweep point of every method on one layer: dicts ``method, knob, value, layer, error,
    byte_density, token_density``. The index is built once per method (StreamingLLM once per window)
    on the keys before the last ``n_queries`` positions; each point decodes a fresh copy."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {m!r}")
    c = layer_qkv
    refs = reference_outputs(c, n_queries)
    n = c.k.shape[1]
    p = n - n_queries
    k, v, q = c.k[:, :p], c.v[:, :p], c.q[:, :p]
    out = []
    wave = {}                                 # the wave variants share a build per set of build fields
    for m in methods:
        if m in WAVE_VARIANTS:
            key = wave_build_key(m)
            if key not in wave:
                wave[key] = _build(m, k, v, q, backend, n)
            built = wave[key]
        else:
            built = None if m == "streaming" else _build(m, k, v, q, backend, n)
        for label, value in sweep(m, n):
            ix = _build(m, k, v, q, backend, n, value) if m == "streaming" else _at(m, built, value)
            e, bd, td = run_point(ix, c, refs, n_queries)
            out.append({"method": m, "knob": label, "value": value, "layer": layer, "error": e,
                        "byte_density": bd, "token_density": td})
    return out


def aggregate(points, layers=None):
    """Per ``(method, knob)``: ``error`` = median over layers of the per-layer median error,
    ``byte_density`` = median over layers, ``token_density`` = mean over layers; ``layers`` restricts
    to those layers."""
    acc = {}
    for r in points:
        if layers is None or r["layer"] in layers:
            acc.setdefault((r["method"], r["knob"]), []).append(r)
    out = []
    for (m, label), rows in acc.items():
        out.append({"method": m, "knob": label, "value": rows[0]["value"],
                    "error": float(np.median([x["error"] for x in rows])),
                    "byte_density": float(np.median([x["byte_density"] for x in rows])),
                    "token_density": float(np.mean([x["token_density"] for x in rows])),
                    "layers": sorted(x["layer"] for x in rows)})
    return out


def error_frontier(captured, methods=METHODS, n_queries=16, backend="fast"):
    """:func:`layer_points` on every layer of ``captured`` (``{layer: LayerQKV}``), :func:`aggregate`d."""
    pts = []
    for layer, c in sorted(captured.items()):
        pts += layer_points(c, methods, n_queries, backend, layer)
    return aggregate(pts)


def interp_error(rows, method, density, key="token_density"):
    """The error of ``method``'s frontier at ``density`` (linear in log density between the two
    surrounding points; ``nan`` outside the swept range)."""
    pts = sorted((r[key], r["error"]) for r in rows if r["method"] == method)
    xs = np.log([x for x, _ in pts])
    ys = [y for _, y in pts]
    x = np.log(density)
    if not len(xs) or x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return float("nan")
    return float(np.interp(x, xs, ys))


# ---------------------------------------------------------------------------------------------- report
LABELS = {"streaming": "StreamingLLM (window)", "topk": "exact top-k oracle (k)", "quest": "Quest (token budget)",
          "ivf": "IVF (nprobe, top_k=100)", "wave": "wave (retrieval fraction)",
          "wave_noest": "wave, no estimation zone", "wave_maxlogit": "wave, max-logit GQA ranking (not in the paper)",
          "wave_ball": "wave, ball-bound ranking (not in the paper)",
          "wave_mix": "wave, half plain / half ball-bound retrieval (not in the paper)",
          "wave_mix_u64": "wave_mix, index update every 64 tokens",
          "wave_mix_noest": "wave_mix, no estimation zone",
          "wave_c4": "wave, 4 keys per cluster", "wave_c4_est50": "wave, 4 keys per cluster, 50% estimated",
          "graph": "graph (k)", "graph_l7": "graph, wide beam at layer 7 (k; not in the paper)",
          "graph_paper": "graph, paper's 128 + 512 static (k)"}
COLORS = {"streaming": "tab:gray", "topk": "black", "quest": "tab:green", "ivf": "tab:purple", "wave": "tab:blue",
          "wave_noest": "tab:cyan", "wave_maxlogit": "tab:olive", "wave_ball": "tab:pink", "wave_mix": "teal",
          "wave_mix_u64": "darkslategray", "wave_mix_noest": "mediumaquamarine", "wave_c4": "indigo",
          "wave_c4_est50": "darkgoldenrod",
          "graph": "tab:orange", "graph_paper": "tab:brown", "graph_l7": "chocolate"}


def _groups(points):
    out = {}
    for p in points:
        out.setdefault((p["corpus"], p["n_tokens"]), []).append(p)
    return out


def wave_vs_oracle(rows, method="wave"):
    """Per point of ``method`` (a wave variant): its error, the oracle's error at the same exact-token density
    (interpolated) and whether the wave index's is lower."""
    out = []
    for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r["token_density"]):
        o = interp_error(rows, "topk", r["token_density"])
        out.append({"knob": r["knob"], "token_density": r["token_density"], "wave": r["error"], "oracle": o,
                    "below": bool(r["error"] < o) if o == o else None})
    return out


def report(db, command, layers, graph_layers, machine=None, samples=None):
    """The markdown of ``benchmarks/results/frontier_error.md`` from the stored sweep ``db``."""
    from .eval import markdown_table

    runs = db.get("runs", [])
    loads = [r.get(k) for r in runs for k in ("load", "load_end") if r.get(k) is not None]
    lines = ["# Attention-error frontier: error against byte density (SmolLM2-135M, captured Q/K/V)", "",
             f"Command: `{command}`  ",
             f"Machine: {machine or 'see benchmarks/machine.py'}  ",
             f"Runs: {', '.join(r.get('start', '?') + ' to ' + r.get('end', '(resumed)') for r in runs)}; "
             f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the runs (2 cores shared with "
             "other jobs: timings are not reported, only errors).  " if loads else "",
             f"Corpora (retrokv.harness.data): `pydoc` (Python reference documentation) and `licenses` (legal prose: "
             f"licence texts shipped by the installed packages); fingerprints "
             f"{runs[-1].get('fingerprints') if runs else '?'}.", "",
             "**Samples.** " + (samples or f"One prompt per corpus and length (the first tokens of the corpus), "
                                f"layers {list(layers)}.") + " "
             f"Every method on layers {list(layers)}; the graph index (built from ALL prefill queries, the slow "
             "part) on the layers each section states: where that is a subset, its `error` cell is empty and the "
             "`err (graph layers)` column gives every method's median over the graph's layers, the column to "
             "compare the graph on. "
             "Decode queries: the last 16 positions (the index is built on the keys before them, the keys in "
             "between are appended), as `retrokv.harness.eval.layer_errors` does.", "",
             "**Error**: per layer the median over the 16 positions of `||o - o_hat|| / ||o||` against float64 full "
             "attention; then the median over layers. **Byte density**: "
             "`bytes_read / (H * N * 4 * (d + dv))` from each index's `last_stats` "
             "(`retrokv.harness.frontier.byte_density`): metadata is counted (wave centroids, estimated value "
             "sums and sizes; Quest min/max pages; IVF centroids and scanned keys; keys scored by the oracle and "
             "the graph search), median over layers. **Token density**: `stats.density`, the fraction of "
             "(query head, token) pairs attended exactly, mean over layers. Every retrieval baseline gets the wave "
             "index's static window: 4 sinks + 64 recent tokens. The exact top-k oracle scores every key, so its "
             "byte density is >= 0.5 at any k: it is the accuracy ceiling at a given *exact* budget, not a "
             "method that saves reads.", ""]
    targets, fine = [], []
    for (corpus, n), pts in sorted(_groups(db["points"]).items()):
        other = [p for p in pts if p["method"] != "graph"]
        gpts = [p for p in pts if p["method"] == "graph"]
        graph_layers = sorted({p["layer"] for p in gpts}) or list(graph_layers)   # the layers actually run
        rows = aggregate(other, layers)
        on_graph_layers = {(r["method"], r["knob"]): r["error"] for r in aggregate(other, graph_layers)}
        for r in rows:
            r["error_graph_layers"] = on_graph_layers.get((r["method"], r["knob"]), float("nan"))
        every = set(graph_layers) >= set(layers)
        rows += [dict(r, error_graph_layers=r["error"], error=r["error"] if every else float("nan"))
                 for r in aggregate(gpts, graph_layers)]
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(key=lambda r: (order[r["method"]], r["byte_density"]))
        lines += [f"## {corpus}, {n} tokens", "", f"Graph measured on layers {graph_layers}." if gpts else
                  "Graph index not measured in this run.", "",
                  markdown_table([{"method": r["method"], "knob": r["knob"], "byte density": r["byte_density"],
                                   "token density": r["token_density"], "error": r["error"],
                                   "err (graph layers)": r["error_graph_layers"]} for r in rows],
                                 ["method", "knob", "byte density", "token density", "error", "err (graph layers)"]),
                  ""]
        equal = []
        wave_default = next((r for r in rows if r["method"] == "wave" and r["value"] == 0.018), None)
        for x in ([wave_default["byte_density"]] if wave_default else []) + [0.10, 0.20]:
            row = {"byte density": x}
            for m in METHODS:
                if m == "topk":
                    continue
                col = "error" if m != "graph" else "error_graph_layers"
                pts_m = [dict(r, error=r[col]) for r in rows if r["method"] == m]
                row[m] = interp_error(pts_m, m, x, "byte_density") if pts_m else float("nan")
            equal.append(row)
        lines += ["Errors at equal byte density (interpolated linearly in log density between swept points; empty: "
                  "outside the method's swept range; the first row is the wave index's paper default, r = 0.018; "
                  "graph on its own layers):", "",
                  markdown_table(equal, ["byte density"] + [m for m in METHODS if m != "topk"]).replace("nan", ""),
                  ""]
        for m in (v for v in WAVE_VARIANTS if WAVE_VARIANTS[v].get("estimation", True)):   # not the ablations
            cmp = wave_vs_oracle(rows, m)
            below = [c for c in cmp if c["below"] is not None]
            if cmp:
                targets.append((m, corpus, n, cmp, sum(c["below"] for c in below), len(below)))
        fine += [r["byte_density"] for r in rows if r["method"] in ("wave_c4", "wave_c4_est50")]
    lines += ["## Target: wave error below the exact top-k oracle's at equal exact budget", "",
              "For each wave point, the oracle's error is interpolated (linear in log token density) at the wave "
              "point's token density (steady + retrieved tokens: the exact budget). The wave index also reads its "
              "estimation zone (value sums of ~23% of the clusters) and all centroids, which the oracle does not "
              "count as exact tokens; the oracle in turn scores every key. `wave_maxlogit` (the wave index with "
              "`group_rank=\"max_logit\"`), `wave_ball` (a ball-bound ranking, `radius_weight=0.5`) and `wave_mix` "
              "(half the retrieved clusters by each of the two, `ball_share=0.5`), none of them in the paper, are "
              "reported beside RetroInfer's ranking; so are `wave_c4` (4 keys per cluster, `tokens_per_cluster=4`, "
              "instead of ~16) and `wave_c4_est50` (also `estimation_budget=0.5` instead of 0.232), the paper's "
              "ranking with its own knobs at other values: their centroids are a quarter of the keys, read every "
              "step" + (f", so they sit at byte densities of {min(fine):.2f}-{max(fine):.2f}." if fine else "."), ""]
    for m, corpus, n, cmp, nb, tot in targets:
        lines += [f"**{m}, {corpus}, {n} tokens**: below oracle at {nb} of {tot} points "
                  f"({'MET' if tot and nb == tot else 'MISSED'}).", "",
                  markdown_table([{"wave knob": c["knob"], "token density": c["token_density"],
                                   "wave error": c["wave"], "oracle error": c["oracle"],
                                   "wave below": "yes" if c["below"] else ("n/a" if c["below"] is None else "no")}
                                  for c in cmp],
                                 ["wave knob", "token density", "wave error", "oracle error", "wave below"]), ""]
    lines += ["## Not done here", "",
              "* Needle-accuracy and perplexity frontiers (issue 16, y axes 2 and 3): measured separately by "
              "`benchmarks/frontier_tasks.py`, in `frontier_needle.md` and `frontier_ppl.md`.",
              "* kvpress's eviction presses: not on this axis (they evict before the question, so there is no "
              "per-step decode error to measure against the same query); their needle accuracy is in "
              "`frontier_kvpress.md` (`make bench-kvpress`, its own virtualenv: kvpress 0.5.x needs transformers < 5.3).",
              "* The graph index's paper static window (128 + 512 tokens, 8-16% of a 4K-8K context by itself) is not "
              "swept here: every retrieval method gets the wave index's 4 + 64 (the task frontiers measure it as "
              "`graph_paper`).", ""]
    return "\n".join(lines)


def plot(db, path, layers=None, graph_layers=None):
    """Log-x error-vs-byte-density plot, one panel per (corpus, length), one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(_groups(db["points"]).items())
    corpora = sorted({c for (c, _), _ in groups})
    lengths = sorted({n for (_, n), _ in groups})
    fig, axes = plt.subplots(len(lengths), len(corpora), figsize=(5.5 * len(corpora), 4.2 * len(lengths) + 1.4),
                             squeeze=False, sharey=True)
    for (corpus, n), pts in groups:
        ax = axes[lengths.index(n)][corpora.index(corpus)]
        for m in METHODS:
            sel = [p for p in pts if p["method"] == m]
            if not sel:
                continue
            lay = sorted({p["layer"] for p in sel}) if m == "graph" else layers
            rows = sorted(aggregate(sel, lay), key=lambda r: r["byte_density"])
            ax.plot([r["byte_density"] for r in rows], [r["error"] for r in rows], "o-", ms=3, color=COLORS[m],
                    label=LABELS[m] + (f" [layers {lay}]" if m == "graph" else ""))
            if m == "topk":
                rows = sorted(rows, key=lambda r: r["token_density"])
                ax.plot([r["token_density"] for r in rows], [r["error"] for r in rows], "--", color="black",
                        alpha=0.5, lw=1, label="top-k oracle at x = exact-token density")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{corpus}, {n} tokens")
        ax.set_xlabel("byte density (bytes read / whole KV, metadata included)")
        ax.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("median relative attention error")
    # below the panels: inside one, the legend hid the oracle's dashed curve and the largest budgets
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 1.4 / (4.2 * len(lengths) + 1.4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------- task frontiers: needle accuracy, perplexity
def needle_prompt(tok, n_tokens, depth, n_keys=1, corpus="pydoc", seed=0):
    """RULER-style needle prompt (:func:`retrokv.harness.eval.needle`, natural-text haystack) whose haystack
    is drawn from ``corpus`` (:data:`retrokv.harness.data.CORPORA`) instead of the default ``pydoc``;
    ``n_keys > 1`` is RULER's multi-key NIAH (distractor needles). For ``corpus="pydoc"`` this is exactly
    ``eval.needle(tok, n_tokens, depth, n_keys, "natural", seed)``. The sample's ``task`` is
    ``"niah_<corpus>"`` or ``"mk<n_keys>_<corpus>"``."""
    import functools

    from . import data
    from . import eval as E

    data._check_corpus(corpus)
    orig = data.natural_text_ids
    data.natural_text_ids = functools.partial(orig, corpus=corpus)   # eval._haystack looks it up at call time
    try:
        s = E.needle(tok, n_tokens, depth, n_keys, "natural", seed)
    finally:
        data.natural_text_ids = orig
    return dataclasses.replace(s, task=f"{'niah' if n_keys == 1 else f'mk{n_keys}'}_{corpus}")


def hf_config(method, value=None):
    """``(registry name, config)`` with which :func:`retrokv.hf.attach` builds ``method`` on the task
    frontiers: the same configs as the error frontier (:func:`_build`: 4 sinks + 64 recent for every
    retrieval baseline; the graph built from all prefill queries). ``value``: StreamingLLM's window."""
    from ..baselines import IVFConfig, QuestConfig, StreamingConfig, TopKConfig
    from ..graph_index import GraphConfig
    from ..wave_index import WaveConfig

    s0, s1 = STATIC
    if method == "full":
        return "full", None
    if method == "streaming":
        if value is None:
            raise ValueError("streaming needs its window as value")
        return "streaming", StreamingConfig(n_sink=s0, n_recent=int(value))
    if method == "graph_paper":                   # RetrievalAttention's static window, sized for 128K contexts
        return "graph", GraphConfig()
    if method in WIDE_LAYERS:                     # the graph; its per-layer beam is set per copy (_at)
        return "graph", GraphConfig(n_sink=s0, n_recent=s1)
    cfgs = {"topk": TopKConfig, "quest": QuestConfig, "ivf": IVFConfig, "graph": GraphConfig}
    if method in cfgs:
        return method, cfgs[method](n_sink=s0, n_recent=s1)
    if method in WAVE_VARIANTS:
        return "wave", WaveConfig(**WAVE_VARIANTS[method])
    raise ValueError(f"method must be 'full' or one of {METHODS}, got {method!r}")


def attached_points(model, saved, n, method, points, backend="fast"):
    """Yield ``(label, value, handle, cache)`` for each ``(label, value)`` of ``points``: ``method``
    attached to ``model`` with its indexes built ONCE from the shared prefill ``saved``
    (:func:`retrokv.harness.eval.shared_prefill`) and, per point, a fresh copy of them with the budget
    knob at ``value`` (:func:`_at`; StreamingLLM is rebuilt per window, which is free), plus an
    :func:`retrokv.hf.index_cache` that resumes after the ``n`` prefill tokens. ``method`` may be
    ``"full"`` (``points`` then holds one dummy point). The model is detached when the generator ends."""
    from .. import hf

    if method == "streaming":
        for label, value in points:
            name, cfg = hf_config(method, value)
            h = hf.attach(model, name, cfg, backend)
            try:
                h.rebuild(saved)
                yield label, value, h, hf.index_cache(len(saved), n)
            finally:
                hf.detach(model)
        return
    name, cfg = hf_config(method)
    h = hf.attach(model, name, cfg, backend)
    try:
        h.rebuild(saved)
        built = dict(h.indexes)
        for label, value in points:
            h.indexes = {layer: [_at(method, ix, value, layer) for ix in lst] for layer, lst in built.items()}
            h.reset_stats()
            yield label, value, h, hf.index_cache(len(saved), n)
    finally:
        hf.detach(model)


def run_density(handle, hq, hkv, d, dv):
    """``(byte density, token density)`` of the decode steps ``handle`` ran: :func:`byte_density` of
    every (layer, step)'s stats, averaged over layers and steps (every layer's KV has the same size,
    so the mean is the model's total bytes read over its total KV); ``(nan, nan)`` without steps."""
    bd, td = [], []
    for layer, steps in handle.stats.items():
        unit = head_unit(handle.indexes[layer][0], hkv, hq)
        for st in steps:
            ns = types.SimpleNamespace(bytes_read=st["bytes_read"])
            bd.append(byte_density(ns, unit, int(st["n_tokens"]), d, dv))
            td.append(float(st["density"]))
    if not bd:
        return float("nan"), float("nan")
    return float(np.mean(bd)), float(np.mean(td))


def teacher_forced(model, cache, logits0, targets):
    """Teacher forcing of ``targets``, one decode step per token through ``cache`` (the method active
    for every predicted token; the first is predicted by the prefill's last logits ``logits0``, as
    :func:`retrokv.harness.eval.perplexity` does). Returns ``(nll, hit)``: per target its negative
    log-likelihood and whether it was the argmax (what greedy decoding would emit after the right prefix)."""
    import torch

    from .eval import _forward

    nll, hit, logits = [], [], logits0
    for i, t in enumerate(targets):
        lp = torch.log_softmax(logits.float(), -1)
        nll.append(float(-lp[int(t)]))
        hit.append(int(lp.argmax()) == int(t))
        if i + 1 < len(targets):
            logits = _forward(model, [int(t)], cache)
    return np.array(nll), np.array(hit, bool)


def forced_answer(model, tok, cache, logits0, answer):
    """Needle scoring by teacher forcing: the answer ``" " + answer`` is fed after the question; the
    sample is **correct** when every answer token after the leading space is the argmax given the right
    prefix (greedy decoding that starts answering would write the whole number). The space itself is
    predicted by the dense prefill and not scored. Returns ``(correct, mean nll of the scored tokens)``.
    The decode steps are ``len(answer tokens) - 1``: every scored token goes through the method."""
    ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    nll, hit = teacher_forced(model, cache, logits0, ids)
    return bool(hit[1:].all()), float(nll[1:].mean())


def needle_rows(results):
    """Per ``(method, knob)`` of needle results (dicts ``prompt, method, knob, value, correct, answer_nll,
    byte_density, token_density``): ``prompts``, ``accuracy``, ``full_accuracy`` (full attention on the
    SAME prompts; nan where full was not run on all of them), ``delta_points`` (100 x the difference),
    mean ``answer_nll``, mean ``byte_density`` and ``token_density``."""
    full = {r["prompt"]: r for r in results if r["method"] == "full"}
    acc = {}
    for r in results:
        acc.setdefault((r["method"], r["knob"]), []).append(r)
    out = []
    for (m, knob), rs in acc.items():
        ps = [r["prompt"] for r in rs]
        fa = float(np.mean([full[p]["correct"] for p in ps])) if all(p in full for p in ps) else float("nan")
        a = float(np.mean([r["correct"] for r in rs]))
        out.append({"method": m, "knob": knob, "value": rs[0]["value"], "prompts": len(rs), "accuracy": a,
                    "full_accuracy": fa, "delta_points": 100 * (a - fa),
                    "answer_nll": float(np.mean([r["answer_nll"] for r in rs])),
                    "byte_density": float(np.mean([r["byte_density"] for r in rs])),
                    "token_density": float(np.mean([r["token_density"] for r in rs]))})
    return out


def ppl_rows(results):
    """Per ``(corpus, method, knob)`` of perplexity results (dicts ``corpus, method, knob, value, ppl,
    byte_density, token_density``): the row with ``delta_pct``, its perplexity increase over full
    attention's on the same corpus in percent (nan without a full row)."""
    full = {r["corpus"]: r["ppl"] for r in results if r["method"] == "full"}
    return [dict({k: r[k] for k in ("corpus", "method", "knob", "value", "ppl", "byte_density", "token_density")},
                 delta_pct=100 * (r["ppl"] / full[r["corpus"]] - 1) if r["corpus"] in full else float("nan"))
            for r in results]


def lowest_matching(rows, ok, below=0.10):
    """Per method (full attention excluded), the row with the lowest ``byte_density`` among ``rows``
    where ``ok(row)`` holds and the byte density is below ``below``; methods with none are absent."""
    out = {}
    for r in sorted(rows, key=lambda r: r["byte_density"]):
        if r["method"] != "full" and r["byte_density"] < below and ok(r) and r["method"] not in out:
            out[r["method"]] = r
    return out


# ---------------------------------------------------------------------------------------------- CLI
FAST_METHODS = ("streaming", "topk", "quest", "ivf", "wave", "wave_noest", "wave_maxlogit")


def run_cli(args):
    """``retrokv eval --frontier``: the small frontier (no graph: its all-queries build takes minutes per
    layer on a laptop; ``benchmarks/frontier.py`` runs it). Both corpora, ``args.lengths[0]`` tokens,
    ``args.frontier_layers``; writes ``frontier.md``, ``frontier.json`` and ``frontier.png`` to ``args.out``."""
    import json
    import os
    import time

    from .cli import CLIError
    from .data import CORPORA, corpus_fingerprint, natural_text_ids
    from .models import capture_qkv, load_smollm2

    try:
        layers = sorted({int(x) for x in str(args.frontier_layers).split(",") if x.strip()})
    except ValueError:
        raise CLIError(f"--frontier-layers must be a comma list of ints, got {args.frontier_layers!r}") from None
    if not layers or min(layers) < 0 or max(layers) > 29:
        raise CLIError(f"--frontier-layers must lie in [0, 29] (SmolLM2 has 30 layers), got {args.frontier_layers!r}")
    n = args.lengths[0]
    t0 = time.time()
    db = {"points": [], "runs": [{"start": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0],
                                  "fingerprints": {c: corpus_fingerprint(c) for c in CORPORA}}]}
    model, tok = load_smollm2()
    for corpus in CORPORA:
        cap = capture_qkv(model, natural_text_ids(tok, n, corpus=corpus), layers=layers)
        for layer in layers:
            pts = layer_points(cap[layer], FAST_METHODS, 16, args.backend, layer)
            for p in pts:
                p.update(corpus=corpus, n_tokens=n)
            db["points"] += pts
            if not args.quiet:
                print(f"{corpus} layer {layer}: done ({time.time() - t0:.0f}s)", flush=True)
    db["runs"][0].update(end=time.strftime("%Y-%m-%d %H:%M:%S"), load_end=os.getloadavg()[0])
    cmd = (f"retrokv eval --frontier --lengths {n} --frontier-layers {','.join(map(str, layers))} "
           f"--backend {args.backend} --out {args.out}")
    import platform

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
               f"Python {platform.python_version()}")
    md = report(db, cmd, layers, (), machine=machine)
    with open(os.path.join(args.out, "frontier.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "frontier.json"), "w") as f:
        json.dump(db, f)
    plot(db, os.path.join(args.out, "frontier.png"), layers)
    print(f"wrote {os.path.join(args.out, 'frontier.md')} and frontier.png ({time.time() - t0:.0f}s)")
    return 0
