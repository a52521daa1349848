"""Why a method misses a passkey: the same prompts with the index's budget given to the exact top-k
oracle, and with a wider search or retrieval budget. Writes ``benchmarks/results/passkey_ablation.md``.

    python benchmarks/passkey_ablation.py --length 8192 --samples 20 --depths 0.145,0.571 [--out ...]

If the oracle with the graph's budget (128 + 512 static + top-100) also misses, the budget is too
small for this model and prompt; if only the graph misses, its search (recall) is at fault.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe  # noqa: E402
from passkey import per_depth  # noqa: E402

from retrokv.harness import eval as E  # noqa: E402


def variants(n):
    """``(label, method, config)``: each index at its default, the oracle at its budget, and wider settings."""
    from retrokv.baselines import TopKConfig
    from retrokv.graph_index import GraphConfig
    from retrokv.wave_index import WaveConfig

    graph = GraphConfig(build_queries=1024)           # the config of the committed results (the demo's then)
    return [
        ("full", "full", None),
        ("wave", "wave", None),
        ("oracle@wave-exact", "topk", TopKConfig(n_sink=4, n_recent=64, top_k=math.ceil(0.018 * n))),
        ("wave retrieval 5%", "wave", WaveConfig(retrieval_budget=0.05)),
        ("graph", "graph", graph),
        ("oracle@graph", "topk", TopKConfig(n_sink=graph.n_sink, n_recent=graph.n_recent, top_k=graph.top_k)),
        ("graph search_L 400", "graph", GraphConfig(build_queries=graph.build_queries, search_L=400)),
        ("graph all queries", "graph", GraphConfig(build_queries=None)),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=20, help="size of the evenly spaced prompt set to pick from")
    ap.add_argument("--depths", required=True, help="comma list of depths as printed by benchmarks/passkey.py")
    ap.add_argument("--only", default="", help="comma list of variant labels to run (default: all but the "
                    "slowest, 'graph all queries')")
    ap.add_argument("--out", default="benchmarks/results/passkey_ablation.md")
    args = ap.parse_args()
    from retrokv.harness.models import load_smollm2

    vs = variants(args.length)
    if not args.only:
        vs = [v for v in vs if v[0] != "graph all queries"]
    else:
        keep = [x.strip() for x in args.only.split(",")]
        unknown = sorted(set(keep) - {lab for lab, _, _ in vs})
        if unknown:
            ap.error(f"--only: unknown variant(s) {unknown}; choose from {[lab for lab, _, _ in vs]}")
        vs = [v for v in vs if v[0] in keep]
    model, tok = load_smollm2()
    # the very prompts of `benchmarks/passkey.py --samples N` (a prompt's passkey and filler depend on
    # its index in that set), picked by the depths its per-prompt table prints
    every = E.make_samples(tok, "passkey", [args.length], args.samples)
    prompts = []
    for d in (float(x) for x in args.depths.split(",")):
        match = [p for p in every if abs(p.depth - d) < 5e-4]
        if not match:
            ap.error(f"no prompt at depth {d} among {[round(p.depth, 3) for p in every]}")
        prompts += match
    t0 = time.time()
    res = E.run_task(model, tok, prompts, [(lab, m) for lab, m, _ in vs],
                     {lab: c for lab, _, c in vs if c is not None}, backend="fast")
    rows = [{"length": args.length, **r, "depths": [p.depth for p in prompts],
             "expected": [p.answer for p in prompts]} for r in res]
    cols = ["method", "samples", "accuracy", "density", "build_s"]
    with open(args.out, "w") as f:
        f.write(f"# Passkey misses: index vs exact top-k at the same budget\n\nCommand: `python "
                f"benchmarks/passkey_ablation.py {shlex.join(sys.argv[1:])}`  \nMachine: {describe()}  \n"
                f"Elapsed: {time.time() - t0:.0f} s. SmolLM2-135M-Instruct, {args.length}-token passkey prompts, "
                f"greedy, 10 new tokens, backend fast. `oracle@X` is the exact top-k with X's exact budget "
                f"(wave: 4 + 64 static + 1.8% of the tokens; graph: 128 + 512 static + top-100).\n\n")
        f.write(E.markdown_table(rows, cols) + "\n" + per_depth(rows))
    print(open(args.out).read())


if __name__ == "__main__":
    main()
