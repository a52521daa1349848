"""Which GQA ranking finds the needle's cluster? RetroInfer's softmax sum against alternatives, at equal cluster counts.

    python benchmarks/needle_rankings.py [--prompts 2 4 5 8 12 18] [--mass 0.1]

For each needle prompt of ``benchmarks/frontier_tasks.py`` (8192 tokens), SmolLM2 runs once on the prompt plus
the teacher-forced answer with full attention (``retrokv.harness.models.capture_qkv``), and every layer's
prompt keys are clustered as the wave index clusters them (``WaveConfig`` defaults). At each answer step,
for each **needle-reading head** (a query head whose full attention puts at least ``--mass`` of its weight on
the needle's digit tokens, as in ``benchmarks/needle_recall.py``), the cluster holding the head's
best-weighted prompt token is located, and its rank (0 = first) is taken under each way of turning the
group's G = 3 query heads' centroid scores ``s[g, i]`` into one ranking of the KV head's clusters:

* ``softmax_sum``: ``sum_g softmax_i(s[g])``, RetroInfer's (§4.2; ``WaveConfig(group_rank="softmax_sum")``);
* ``softmax_max``: ``max_g softmax_i(s[g])``;
* ``max_logit``: ``max_g s[g, i]`` (``WaveConfig(group_rank="max_logit")``);
* ``round_robin``: the union of the heads' own orders, taken one cluster per head in turn (each head gets
  an equal share of the retrieval zone);
* ``own head`` (not a group ranking: a bound): the order by that head's own scores alone, what a
  per-query-head index (no GQA sharing) would use.

Then the cluster's **score** itself (the centroid dilutes one sharp key among the cluster's 16), each as the
group's max over its heads (as ``max_logit``), with ``r_i`` the cluster's radius (the largest distance of one of
its keys from the centroid: one float per cluster, not stored by the wave index):

* ``ball 0.5`` / ``ball 1``: ``max_g (q_g . C_i + lam |q_g| r_i) / sqrt(d)`` with lam = 0.5 / 1 (lam = 1 is an
  upper bound on the cluster's best key score, by Cauchy-Schwarz);
* ``best key`` (an oracle, not an index: it scores every key): ``max_g max_{j in i} q_g . k_j / sqrt(d)``.

A cluster ranked below r is retrieved by a wave index that retrieves r clusters per KV head (r = 9 and 40
are the frontier's r = 0.018 and 0.08 at 8K: 9 and 40 of ~505 clusters).

Writes benchmarks/results/needle_rankings.md.
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

OUT = os.path.join(HERE, "results", "needle_rankings.md")
RANKINGS = ("softmax_sum", "softmax_max", "max_logit", "round_robin", "own head", "ball 0.5", "ball 1", "best key")
COUNTS = (9, 20, 40, 80)


def group_orders(scores):
    """``({ranking: (Hkv, C) cluster ids, best first}, own (Hkv, G, C))`` for the centroid scores ``(Hkv, G, C)``
    (``-inf``: empty): the rankings the library does not have (``softmax_max``, ``round_robin``; the caller
    takes ``softmax_sum`` and ``max_logit`` from ``rank_clusters``); ``own`` orders each query head's clusters by
    its own scores."""
    hkv, g, c = scores.shape
    p = np.exp(scores - scores.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    own = np.argsort(-scores, axis=2, kind="stable")                     # (Hkv, G, C)
    rr = np.empty((hkv, c), np.int64)
    for h in range(hkv):
        seen = dict.fromkeys(int(x) for x in own[h].T.ravel())            # heads in turn, first occurrence kept
        rr[h] = list(seen)
    return {"softmax_max": np.argsort(-p.max(axis=1), axis=1, kind="stable"), "round_robin": rr}, own


def best_key_order(qb, keys, offsets, sizes, d):
    """``(Hkv, C)`` clusters by their best key score over the group's heads (an oracle: every key is scored)."""
    hkv, c = sizes.shape
    out = np.empty((hkv, c), np.int64)
    for h in range(hkv):
        s = (keys[h, :offsets[h, -1]] @ qb[h].T).max(axis=1) / np.sqrt(d)   # each sorted row's best score
        best = np.full(c, -np.inf)
        full = sizes[h] > 0
        best[full] = np.maximum.reduceat(s, offsets[h, :-1][full])
        out[h] = np.argsort(-best, kind="stable")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2, 4, 5, 8, 12, 18])
    ap.add_argument("--mass", type=float, default=0.1)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    from needle_recall import load_needles, needle_run

    from retrokv import methods
    from retrokv.reference import wave_index as ref_wave
    from retrokv.wave_index import WaveConfig

    t0 = time.time()
    model, tok, g, prompts = load_needles(args.prompts)
    ranks = {r: [] for r in RANKINGS}
    where = []                                                          # (prompt, layer, query head, step)
    for i in args.prompts:
        s = prompts[i]
        L, span, caps, steps = needle_run(model, tok, s)
        for li in sorted(caps):
            lay = caps[li]
            meta = methods.build("wave", lay.k[:, :L], lay.v[:, :L], backend="fast", config=WaveConfig()).meta
            cent, sizes, offsets, ids = (np.asarray(x) for x in (meta.centroids, meta.sizes, meta.offsets, meta.ids))
            keys = np.asarray(meta.keys)
            cluster_of = np.full((cent.shape[0], L), -1)
            radius = np.zeros(cent.shape[:2])
            for h in range(cent.shape[0]):
                for c in range(cent.shape[1]):
                    a, b = offsets[h, c], offsets[h, c + 1]
                    cluster_of[h, ids[h, a:b]] = c
                    if b > a:
                        radius[h, c] = np.linalg.norm(keys[h, a:b] - cent[h, c], axis=1).max()
            d = lay.q.shape[-1]
            for pos in steps:                                           # the steps that predict the digits
                qs = lay.q[:, pos].astype(np.float64)
                sc = np.stack([lay.k[hq // g, :pos + 1].astype(np.float64) @ qs[hq] for hq in range(qs.shape[0])])
                w = np.exp(sc / np.sqrt(d) - (sc / np.sqrt(d)).max(axis=1, keepdims=True))
                w /= w.sum(axis=1, keepdims=True)
                cs = np.einsum("hgd,hcd->hgc", qs.reshape(cent.shape[0], g, d), cent) / np.sqrt(d)
                cs = np.where(sizes[:, None, :] > 0, cs, -np.inf)
                orders, own = group_orders(cs)
                qn = np.linalg.norm(qs, axis=1).reshape(cent.shape[0], g, 1) / np.sqrt(d)     # (Hkv, G, 1)
                for lam in (0.5, 1):
                    orders[f"ball {lam:g}"] = np.argsort(-(cs + lam * qn * radius[:, None, :]).max(axis=1),
                                                         axis=1, kind="stable")
                orders["best key"] = best_key_order(qs.reshape(cent.shape[0], g, d), keys, offsets, sizes, d)
                for gr in ref_wave.GROUP_RANKS:                         # the library's own rankings (float32)
                    rank = ref_wave.rank_clusters(lay.q[:, pos], cent, sizes, 1 / np.sqrt(d), gr)[1]
                    orders[gr] = np.argsort(-rank, axis=1, kind="stable")
                for hq in range(qs.shape[0]):
                    h, top = hq // g, int(np.argmax(w[hq]))
                    if w[hq, span].sum() < args.mass or top >= L or cluster_of[h, top] < 0:
                        continue                                        # not reading the needle, or a steady token
                    c = cluster_of[h, top]
                    for r, o in orders.items():
                        ranks[r].append(int(np.nonzero(o[h] == c)[0][0]))
                    ranks["own head"].append(int(np.nonzero(own[h, hq % g] == c)[0][0]))
                    where.append((i, li, hq, pos - L))
        del caps                                                        # one prompt's capture in memory at a time
        print(f"prompt {i}: {len(where)} head-steps so far, {time.time() - t0:.0f}s", flush=True)

    ranks = {r: np.array(x) for r, x in ranks.items()}
    lines = ["# Which GQA ranking finds the needle's cluster (SmolLM2-135M, 8192 tokens)", "",
             f"Command: `python benchmarks/needle_rankings.py --prompts {' '.join(map(str, args.prompts))} "
             f"--mass {args.mass}`  ", f"Machine: {describe()}", "",
             __doc__.split("\n\n", 2)[2].split("Writes")[0].strip(), "",
             f"**{len(where)} needle-reading (prompt, layer, query head, answer step)** whose best-weighted token "
             "lies in a cluster. Share of them whose cluster ranks within the first r clusters:", "",
             "| r | " + " | ".join(RANKINGS) + " |", "|---" * (len(RANKINGS) + 1) + "|"]
    for r in COUNTS:
        lines.append(f"| {r} | " + " | ".join(f"{np.mean(ranks[x] < r):.3f}" for x in RANKINGS) + " |")
    lines += ["", "Median rank: " + ", ".join(f"{x} {np.median(ranks[x]):.0f}" for x in RANKINGS) + ".", ""]
    sharp = [j for j, (_, li, hq, _) in enumerate(where) if (li, hq) == (7, 7)]
    if sharp:
        lines += [f"Layer 7, query head 7 (the head that loses the needle in `needle_recall.md`), {len(sharp)} "
                  "head-steps: median rank " + ", ".join(f"{x} {np.median(ranks[x][sharp]):.0f}" for x in RANKINGS)
                  + "; within 40: " + ", ".join(f"{x} {np.mean(ranks[x][sharp] < 40):.2f}" for x in RANKINGS) + ".",
                  ""]
    lines += [f"Total time {time.time() - t0:.0f} s."]
    write_report(args.out, lines, 12)


if __name__ == "__main__":
    main()
