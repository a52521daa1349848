"""The attention-error frontier (issue 16, y axis 1): error against byte density, every method, both corpora.

Captures SmolLM2-135M's real post-RoPE Q/K/V on an 8192-token prompt of each built-in corpus
(``pydoc``: Python's reference documentation; ``licenses``: legal prose, see retrokv.harness.data)
for an even subset of layers, and sweeps each method's budget knob (retrokv.harness.frontier.sweep)
at 4096 tokens (the first 4096 tokens of the same capture: the model is causal, so this is exactly
a 4096-token prompt) and at 8192 tokens. Per point: the median over layers of the per-layer median
relative decode-attention error of the last 16 positions (as retrokv.harness.eval.layer_errors).

    python benchmarks/frontier.py run            # capture + sweep, appends to frontier_error.json (resumable)
    python benchmarks/frontier.py report         # tables -> benchmarks/results/frontier_error.md, plot -> docs/img

Stage "run" caches each (corpus, length, layer, method) block, so it can be stopped and resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

LAYERS = (1, 5, 9, 13, 17, 21, 25, 29)      # every 4th of SmolLM2's 30 layers
GRAPH_LAYERS = LAYERS                       # --graph-layers narrows it (its build from all prefill queries is the slow part)
LENGTHS = (4096, 8192)
CORPORA = ("pydoc", "licenses")
JSON = os.path.join(HERE, "results", "frontier_error.json")
CACHE = os.environ.get("FRONTIER_CACHE", "/tmp/frontier_cache")


def capture(corpus):
    path = os.path.join(CACHE, f"{corpus}_8192.npz")
    if os.path.exists(path):
        z = np.load(path)
        return {layer: (z[f"q{layer}"], z[f"k{layer}"], z[f"v{layer}"]) for layer in LAYERS}
    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import capture_qkv, load_smollm2

    model, tok = load_smollm2()
    cap = capture_qkv(model, natural_text_ids(tok, 8192, corpus=corpus), layers=list(LAYERS))
    os.makedirs(CACHE, exist_ok=True)
    arrs = {}
    for layer, c in cap.items():
        arrs.update({f"q{layer}": c.q, f"k{layer}": c.k, f"v{layer}": c.v})
    np.savez(path, **arrs)
    return {layer: (c.q, c.k, c.v) for layer, c in cap.items()}


def load_json():
    if os.path.exists(JSON):
        with open(JSON) as f:
            return json.load(f)
    return {"points": [], "done": [], "runs": []}


def save_json(db):
    tmp = JSON + ".tmp"
    with open(tmp, "w") as f:
        json.dump(db, f, indent=0)
    os.replace(tmp, JSON)


def run(args):
    import types

    from retrokv.harness import frontier as F
    from retrokv.harness.data import corpus_fingerprint

    db = load_json()
    done = {tuple(x) for x in db["done"]}
    db["runs"].append({"start": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0],
                       "fingerprints": {c: corpus_fingerprint(c) for c in CORPORA}})
    # the target's methods first; the graph (slowest build) last, 4096 tokens before 8192
    methods = [m for m in args.methods.split(",")]

    def finished(*key):
        return list(key) in db["done"] or key in done

    for m in methods:
        for n in LENGTHS:
            for corpus in CORPORA:
                cap = capture(corpus)
                for layer in (args.graph_layers if m == "graph" else LAYERS):
                    if finished(corpus, n, layer, m):
                        continue
                    q, k, v = cap[layer]
                    c = types.SimpleNamespace(q=q[:, :n], k=k[:, :n], v=v[:, :n])
                    t0 = time.time()
                    group = (m,)
                    if m in F.WAVE_VARIANTS:                      # one build for every wave variant still to do
                        group = tuple(x for x in methods if x in F.WAVE_VARIANTS and not finished(corpus, n, layer, x))
                    pts = F.layer_points(c, group, 16, args.backend, layer)
                    for p in pts:
                        p.update(corpus=corpus, n_tokens=n)
                    db["points"] += pts
                    db["done"] += [[corpus, n, layer, g] for g in group]
                    save_json(db)
                    print(f"{corpus} n={n} layer={layer} {m}: {time.time() - t0:.1f}s load={os.getloadavg()[0]:.1f}",
                          flush=True)
    db["runs"][-1]["end"] = time.strftime("%Y-%m-%d %H:%M:%S")
    db["runs"][-1]["load_end"] = os.getloadavg()[0]
    save_json(db)


def report(args):
    from retrokv.harness import frontier as F

    db = load_json()
    sys.path.insert(0, HERE)
    from machine import describe

    md = F.report(db, command="python benchmarks/frontier.py run --graph-layers 5,13,21,29; python benchmarks/frontier.py "
                              "run --methods graph --graph-layers 1,9,17,25; python benchmarks/frontier.py run --methods "
                              "wave_maxlogit; python benchmarks/frontier.py run --methods wave_ball; python benchmarks/frontier.py run "
                              "--methods wave_mix; python benchmarks/frontier.py run --methods wave_c4,wave_c4_est50; "
                              "python benchmarks/frontier.py report",
                  layers=LAYERS, graph_layers=GRAPH_LAYERS, machine=describe(),
                  samples="One 8192-token prompt per corpus (its first 8192 tokens); the 4096-token results use the "
                          "first 4096 tokens of the same capture (the model is causal: identical to a 4096-token "
                          "prompt). Layers 1, 5, ..., 29: every 4th of SmolLM2's 30. The two runs together are one "
                          "`python benchmarks/frontier.py run`; the first was stopped once (to share the wave build "
                          "with wave_noest) and resumed from its cache; the per-block log showed 1-minute loads of "
                          "5.6-8.9.")
    with open(os.path.join(HERE, "results", "frontier_error.md"), "w") as f:
        f.write(md)
    F.plot(db, os.path.join(ROOT, "docs", "img", "frontier_error.png"))
    print(md)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("run", "report"))
    ap.add_argument("--backend", default="fast")
    ap.add_argument("--methods", default="streaming,topk,wave,wave_noest,wave_maxlogit,wave_ball,wave_mix,wave_c4,"
                                             "wave_c4_est50,quest,ivf,graph")
    ap.add_argument("--graph-layers", type=lambda s: tuple(int(x) for x in s.split(",")), default=GRAPH_LAYERS,
                    help="layers for the graph (default: 4 of the 8); the report says which were run")
    a = ap.parse_args()
    run(a) if a.stage == "run" else report(a)
