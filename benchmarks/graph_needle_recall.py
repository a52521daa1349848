"""Why the graph index misses needles at 8K that exact top-k finds: its search's recall at the needle heads.

    python benchmarks/graph_needle_recall.py [--prompts 2 4 5 8 12 18] [--k 41 131] [--wide 1000]

The graph index's twin of ``benchmarks/needle_recall.py`` (same prompts, same needle-reading heads: query
heads whose full attention puts at least ``--mass`` of its weight on the needle's digit tokens at an answer
step). Per layer the graph is built as the needle frontier builds it (RetrievalAttention's projection of
ALL prefill queries, the 4 + 64 static window of every retrieval baseline, ``search_L = max(150, k + 50)``),
over the prompt's keys. For each needle-reading (layer, head, step) it asks which of the needle's tokens
are among the ``k`` keys retrieved:

* **graph**: by the beam search, as decoding runs it;
* **graph, wide beam**: by the same search with a candidate list of ``--wide`` entries;
* **exact top-k**: by the head's true scores over the same indexed keys (the oracle the search approximates).

The static tokens (sinks, window, answer) are attended by every variant and are not counted: the needle
lies deep in the prompt. **Next digit** is whether the needle token the step must write is retrieved.
``scanned`` is the mean number of keys the search scored per head (what sets its byte density). Beside the
needle heads, every head's answer-step output: its error relative to full attention when it attends the
static tokens plus the search's ``k`` keys, and plus the exact top-k (mean over heads and steps, per layer).

Writes benchmarks/results/graph_needle_recall.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from machine import describe, write_report  # noqa: E402
from needle_recall import load_needles, needle_run  # noqa: E402

OUT = os.path.join(HERE, "results", "graph_needle_recall.md")


def _mean(rows, key):
    return float(np.mean([x[key] for x in rows])) if rows else float("nan")


def output_error(w, vv, sel, full):
    """Relative error of attention restricted to the positions ``sel`` (full attention's weights ``w``
    renormalised over them) against the full output ``full``."""
    ws = w[sel]
    return float(np.linalg.norm(ws @ vv[sel] / ws.sum() - full) / max(np.linalg.norm(full), 1e-30))


def needle_rows(lay, graph, L, span, steps, mass_min, g, ks, wide):
    """For one layer and each ``k``: one row per needle-reading (query head, step) (the needle recall of the
    search, of the wide search and of the exact top-k, whether the next digit is retrieved, keys scanned),
    and the answer-step output error of the search and of the exact top-k, mean over all heads and steps."""
    q, k, v = lay.q, lay.k, lay.v                               # (Hq, T, d), (Hkv, T, d) post-RoPE
    d = q.shape[-1]
    lo, hi = graph.lo, graph.hi                                 # the indexed positions [lo, hi)
    rows = {kk: [] for kk in ks}
    errs = {kk: [] for kk in ks}
    for pos in steps:
        qs = np.ascontiguousarray(q[:, pos])                    # (Hq, d)
        sc = np.stack([k[hq // g, :pos + 1].astype(np.float64) @ qs[hq].astype(np.float64)
                       for hq in range(q.shape[0])]) / np.sqrt(d)
        w = np.exp(sc - sc.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        heads = [hq for hq in range(q.shape[0]) if w[hq, span].sum() >= mass_min]
        nxt = span[min(pos - steps[0], len(span) - 1)]
        static = np.r_[np.arange(lo), np.arange(hi, pos + 1)]   # sinks, window and the answer so far
        for kk in ks:
            got, scanned = graph.search(qs, k=kk, L=max(150, kk + 50))
            got_w, _ = graph.search(qs, k=kk, L=max(wide, kk)) if heads else (None, None)
            err_g, err_t = [], []
            for hq in range(q.shape[0]):
                top = lo + np.argsort(-sc[hq, lo:hi], kind="stable")[:kk]
                vv = v[hq // g, :pos + 1].astype(np.float64)
                full = w[hq] @ vv
                err_g.append(output_error(w[hq], vv, np.r_[static, got[hq][got[hq] >= 0]], full))
                err_t.append(output_error(w[hq], vv, np.r_[static, top], full))
                if hq in heads:
                    rows[kk].append(dict(graph=np.isin(span, got[hq]).mean(), wide=np.isin(span, got_w[hq]).mean(),
                                         topk=np.isin(span, top).mean(), next_graph=float(nxt in got[hq]),
                                         next_topk=float(nxt in top), scanned=float(scanned[hq])))
            errs[kk].append((np.mean(err_g), np.mean(err_t)))
    return rows, {kk: np.mean(e, axis=0) for kk, e in errs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2, 4, 5, 8, 12, 18])
    ap.add_argument("--k", type=int, nargs="+", default=[41, 131], help="keys retrieved per head")
    ap.add_argument("--wide", type=int, default=1000, help="candidate list of the wide-beam search")
    ap.add_argument("--mass", type=float, default=0.1, help="needle-reading head: this much full-attention mass")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    for name, xs in (("--k", args.k), ("--prompts", args.prompts)):
        if any(x < (1 if name == "--k" else 0) for x in xs):
            raise SystemExit(f"{name} must be {'positive' if name == '--k' else 'non-negative'}, got {xs}")

    from retrokv.graph_index import GraphConfig, GraphIndex
    from retrokv.harness.frontier import STATIC

    t0 = time.time()
    model, tok, g, prompts = load_needles(args.prompts)
    lines = ["# Graph-index needle recall at the heads that read the needle (SmolLM2-135M, 8192 tokens)", "",
             f"Command: `python benchmarks/graph_needle_recall.py --prompts {' '.join(map(str, args.prompts))} "
             f"--k {' '.join(map(str, args.k))} --wide {args.wide} --mass {args.mass}`  ",
             f"Machine: {describe()}", "", __doc__.split("\n\n", 2)[2].split("Writes")[0].strip(), "",
             "| prompt | task | k | needle-reading (layer, head, step) | graph recall | graph recall, "
             f"L = {args.wide} | exact top-k recall | next digit, graph | next digit, top-k | keys scanned "
             "| answer-step error, graph / top-k (median over layers) | the layer where the graph is furthest "
             "behind: graph / top-k |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    total = {kk: [] for kk in args.k}
    for i in args.prompts:
        s = prompts[i]
        L, span, caps, steps = needle_run(model, tok, s)
        rows, errs = {kk: [] for kk in args.k}, {kk: [] for kk in args.k}
        for li in sorted(caps):
            lay = caps[li]
            graph = GraphIndex.build(lay.k[:, :L], lay.v[:, :L], lay.q[:, :L], backend="fast",
                                     config=GraphConfig(n_sink=STATIC[0], n_recent=STATIC[1]))
            got, err = needle_rows(lay, graph, L, span, steps, args.mass, g, args.k, args.wide)
            for kk in args.k:
                rows[kk] += got[kk]
                errs[kk].append((li, *err[kk]))
        for kk in args.k:
            total[kk] += rows[kk]
            f = lambda key: _mean(rows[kk], key)                       # noqa: E731
            e = np.array(errs[kk])                                   # (layers, 3): layer, graph, top-k
            worst = int(np.argmax(e[:, 1] - e[:, 2]))
            lines.append(f"| {i} | {s.task} | {kk} | {len(rows[kk])} | {f('graph'):.2f} | {f('wide'):.2f} | "
                         f"{f('topk'):.2f} | {f('next_graph'):.2f} | {f('next_topk'):.2f} | {f('scanned'):.0f} | "
                         f"{np.median(e[:, 1]):.3f} / {np.median(e[:, 2]):.3f} | {int(e[worst, 0])}: "
                         f"{e[worst, 1]:.3f} / {e[worst, 2]:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", "All prompts together:", "", "| k | needle-reading (layer, head, step) | graph recall | graph recall, "
              f"L = {args.wide} | exact top-k recall | next digit, graph | next digit, top-k |", "|---|---|---|---|---|---|---|"]
    for kk, rows in total.items():
        f = lambda key: _mean(rows, key)                                # noqa: E731
        lines.append(f"| {kk} | {len(rows)} | {f('graph'):.2f} | {f('wide'):.2f} | {f('topk'):.2f} | "
                     f"{f('next_graph'):.2f} | {f('next_topk'):.2f} |")
    lines += ["", f"Total time {time.time() - t0:.0f} s."]
    write_report(args.out, lines, 8)


if __name__ == "__main__":
    main()
