"""Why the wave index misses needles at 8K that exact top-k finds: needle recall at the heads that read it.

    python benchmarks/needle_recall.py [--prompts 2 4 5 8 12 18] [--budgets 0.018 0.08]

For each needle prompt of ``benchmarks/frontier_tasks.py`` (8192 tokens; the same prompts and index
configs as the needle frontier), SmolLM2 runs once on the prompt plus the teacher-forced answer with
full attention (``retrokv.harness.models.capture_qkv``). At the answer steps (the queries that predict the
answer's digits) it finds the **needle-reading heads**: query heads whose full attention puts at least
``--mass`` of its weight on the needle's digit tokens (located in the prompt by their token ids). For each
such (layer, head, step) it asks where the needle's tokens land:

* **wave**: the wave index (``WaveConfig`` defaults, retrieval fraction ``r``) built on the prompt's keys:
  in its exact zone (retrieved clusters and the steady tokens), in its estimation zone, or dropped; and
  the rank of the best needle cluster in the wave ranking (retrieved when below the retrieval count);
* **top-k at equal count**: the same number of exact tokens chosen by this head's true scores (the exact
  top-k oracle given the wave's exact budget).

Beside the needle heads, every head's answer-step output: its relative error against full attention for
the wave index and for the exact top-131 oracle with 4 + 64 static tokens, the frontier's smallest top-k
point, which answers as often as top-418 and top-1300 (0.55).

Recall is the fraction of needle tokens attended exactly, over the needle-reading heads. **Next digit**
is sharper: whether the one needle token the step must write (digit t at answer step t, the token a
copying head attends to) is attended exactly, by the wave index and by the exact top-131 oracle. Each answer
token is appended to the wave index before its step, as in decoding, so the answer tokens are in the
steady window of every method.

Writes benchmarks/results/needle_recall.md.
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

OUT = os.path.join(HERE, "results", "needle_recall.md")
TOPK = 131              # the needle frontier's smallest top-k point (0.55 accuracy, as at k = 418 and 1300)


def needle_span(prompt_ids, answer_ids):
    """Positions of the needle's digit tokens in the prompt: the last occurrence of ``answer_ids`` (the
    question does not repeat the number; distractor needles have other numbers)."""
    p, a = np.asarray(prompt_ids), np.asarray(answer_ids)
    hits = [i for i in range(len(p) - len(a) + 1) if np.array_equal(p[i:i + len(a)], a)]
    if not hits:
        raise ValueError("the answer's tokens do not occur in the prompt")
    return np.arange(hits[-1], hits[-1] + len(a))


def load_needles(prompt_ids):
    """SmolLM2, its tokenizer, its GQA group size and the needle frontier's prompts ``{i: sample}`` for the
    indices ``prompt_ids`` (benchmarks/frontier_tasks.py's, 8192 tokens): the set-up of the needle analyses."""
    from frontier_tasks import N, needle_prompts
    from retrokv.harness.models import load_smollm2

    model, tok = load_smollm2()
    prompts = dict(needle_prompts(tok, max(prompt_ids) + 1, N))
    return model, tok, model.config.num_attention_heads // model.config.num_key_value_heads, prompts


def needle_run(model, tok, sample):
    """One needle prompt with full attention over the prompt plus the teacher-forced answer:
    ``(L, span, caps, steps)``, the prompt length, the needle's positions (:func:`needle_span`), every layer's
    captured Q/K/V and the positions of the queries that predict the answer's digits."""
    from retrokv.harness.models import capture_qkv

    answer = tok(" " + sample.answer, add_special_tokens=False)["input_ids"]
    L = len(sample.prompt_ids)
    span = needle_span(sample.prompt_ids, tok(sample.answer, add_special_tokens=False)["input_ids"])
    caps = capture_qkv(model, list(sample.prompt_ids) + answer[:-1])
    return L, span, caps, range(L, L + len(answer) - 1)


def head_rows(layer, wave_ix, L, span, steps, mass_min, g):
    """One row per needle-reading (query head, step) of one layer: needle mass, recalls, cluster rank."""
    from retrokv.reference import wave_index as ref_wave

    q, k = layer.q, layer.k                                     # (Hq, T, d), (Hkv, T, d) post-RoPE
    d = q.shape[-1]
    rows = []
    meta = wave_ix.meta
    ids_h = [np.asarray(meta.ids[h]) for h in range(k.shape[0])]
    offsets = np.asarray(meta.offsets)
    cluster_of = []                                             # token position -> cluster, per KV head
    for h in range(k.shape[0]):
        c = np.full(L, -1, np.int64)
        for i in range(offsets.shape[1] - 1):
            c[ids_h[h][offsets[h, i]:offsets[h, i + 1]]] = i
        cluster_of.append(c)
    errs = []
    for pos in steps:
        wave_ix.append(k[:, pos], layer.v[:, pos])              # a decode step: this token's KV first
        qs = q[:, pos]                                          # (Hq, d)
        out_wave = np.asarray(wave_ix.attend(qs), np.float64)
        st = wave_ix.last_stats
        sc = np.stack([k[hq // g, :pos + 1].astype(np.float64) @ qs[hq].astype(np.float64)
                       for hq in range(q.shape[0])]) / np.sqrt(d)           # full attention's scores (Hq, pos + 1)
        w = np.exp(sc - sc.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        mean_wave, mean_top, worst = output_errors(layer, sc, w, pos, L, out_wave, g, st.exact_ids, span)
        scores, rank = ref_wave.rank_clusters(qs, np.asarray(meta.centroids), np.asarray(meta.sizes), 1 / np.sqrt(d))
        order = np.argsort(-rank, axis=1, kind="stable")
        # the worst head's best-weighted token: where its cluster ranks for the group and for this head alone
        hw = worst["head"] // g
        cl = cluster_of[hw][worst["token"]] if worst["token"] < L else -1
        own = np.argsort(-scores[hw, worst["head"] % g], kind="stable")
        worst.update(group_rank=int(np.nonzero(order[hw] == cl)[0][0]) if cl >= 0 else -1,
                     own_rank=int(np.nonzero(own == cl)[0][0]) if cl >= 0 else -1,
                     retrieved=len(st.retrieval_clusters[hw]))
        errs.append((mean_wave, mean_top, worst))
        for hq in range(q.shape[0]):
            h = hq // g
            mass = float(w[hq, span].sum())
            if mass < mass_min:
                continue
            exact = np.asarray(st.exact_ids[h])
            n_exact = int((exact < L).sum())                    # prompt tokens attended exactly
            nxt = span[min(pos - steps[0], len(span) - 1)]      # the needle token this step must write
            est = set(np.asarray(st.estimation_clusters[h]).tolist())
            in_exact = np.isin(span, exact)
            in_est = np.array([cluster_of[h][t] in est for t in span]) & ~in_exact
            by_score = np.argsort(-sc[hq, :L], kind="stable")
            ranks = [int(np.nonzero(order[h] == cluster_of[h][t])[0][0]) for t in span if cluster_of[h][t] >= 0]
            rows.append(dict(mass=mass, wave=float(in_exact.mean()), est=float(in_est.mean()),
                             topk=float(np.isin(span, by_score[:n_exact]).mean()), n_exact=n_exact,
                             next_wave=float(nxt in exact), next_topk=float(nxt in by_score[:TOPK]),
                             rank=min(ranks) if ranks else -1, r=len(st.retrieval_clusters[h])))
    return rows, errs


def output_errors(layer, sc, w, pos, L, out_wave, g, exact_ids, span, k_top=TOPK, static=(4, 64)):
    """Relative error of this step's attention output, from full attention's scores ``sc`` and weights ``w``
    (Hq, pos + 1): the wave's and the exact top-k oracle's averaged over the query heads (the oracle as the
    needle frontier runs it: ``k_top`` prompt tokens by score per head, plus 4 sinks and the 64 most recent
    prompt tokens; the answer tokens so far are attended by both, as in a decode step), and the worst head:
    ``{err, head, needle, top, exact_mass, topk_err, token}`` (its needle mass, its largest weight, the mass
    in the wave's exact zone, its best-weighted token)."""
    v = layer.v
    keep = np.zeros(pos + 1, bool)
    keep[:static[0]] = True
    keep[L - static[1]:] = True                               # the recent window and the answer tokens
    cand = np.nonzero(~keep[:L])[0]
    ew, et, worst = [], [], {"err": -1.0}
    for hq in range(sc.shape[0]):
        h = hq // g
        vv = v[h, :pos + 1].astype(np.float64)
        full = w[hq] @ vv
        sel = keep.copy()
        sel[cand[np.argsort(-sc[hq, cand], kind="stable")[:k_top]]] = True
        wt = np.where(sel, w[hq], 0.0)
        top = wt @ vv / wt.sum()
        nrm = max(np.linalg.norm(full), 1e-30)
        ew.append(np.linalg.norm(out_wave[hq] - full) / nrm)
        et.append(np.linalg.norm(top - full) / nrm)
        if ew[-1] > worst["err"]:
            worst = dict(err=ew[-1], head=hq, needle=float(w[hq, span].sum()), top=float(w[hq].max()),
                         exact_mass=float(w[hq, np.asarray(exact_ids[h])].sum()), topk_err=et[-1],
                         token=int(np.argmax(w[hq])))
    return float(np.mean(ew)), float(np.mean(et)), worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[2, 4, 5, 8, 12, 18])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.018, 0.08])
    ap.add_argument("--mass", type=float, default=0.1, help="needle-reading head: this much full-attention mass")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    import dataclasses

    from retrokv import methods
    from retrokv.wave_index import WaveConfig

    t0 = time.time()
    model, tok, g, prompts = load_needles(args.prompts)
    lines = ["# Needle recall at the heads that read the needle (SmolLM2-135M, 8192 tokens)", "",
             f"Command: `python benchmarks/needle_recall.py --prompts {' '.join(map(str, args.prompts))} "
             f"--budgets {' '.join(map(str, args.budgets))} --mass {args.mass}`  ",
             f"Machine: {describe()}", "", __doc__.split("\n\n", 2)[2].split("Writes")[0].strip(), "",
             "| prompt | task | depth | r | needle-reading (layer, head, step) | wave exact recall | wave in estimation "
             "| top-k recall, same exact count | exact tokens | median rank of the needle cluster | clusters retrieved "
             f"| answer-step error, wave (median over layers) | the same, exact top-{TOPK} "
             f"| next digit exact, wave | next digit in top-{TOPK} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {r: [] for r in args.budgets}
    errors = {r: [] for r in args.budgets}
    worst_lines = ["", "The head with the largest wave error at an answer step, per prompt and budget (the needle's "
                   "mass, the head's largest weight and the mass the wave's exact zone holds, all of full "
                   "attention's weights; the rank of the cluster holding the head's best-weighted token, 0 = first, "
                   "in the wave ranking, which sums the softmax over centroids of the group's query heads, and by "
                   "the head's own centroid scores):", "",
                   f"| prompt | task | r | layer | query head | answer step | wave error | top-{TOPK} error | needle mass "
                   "| top weight | mass in the exact zone | its top token's cluster: group rank / clusters retrieved "
                   "| the same cluster's rank by this head's centroid scores alone |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in args.prompts:
        s = prompts[i]
        L, span, caps, steps = needle_run(model, tok, s)
        for r in args.budgets:
            rows, err_layers, worst_heads = [], [], []
            for li in sorted(caps):
                lay = caps[li]
                ix = methods.build("wave", lay.k[:, :L], lay.v[:, :L], backend="fast",
                                   config=dataclasses.replace(WaveConfig(), retrieval_budget=r))
                got, errs = head_rows(lay, ix, L, span, steps, args.mass, g)
                rows += got
                err_layers.append(np.mean([e[:2] for e in errs], axis=0))   # (wave, top-k) mean over the steps
                worst_heads += [(e[2], li, t) for t, e in enumerate(errs)]
            err_layers = np.array(err_layers)
            errors[r].append(err_layers)
            wh, li, t = max(worst_heads, key=lambda x: x[0]["err"])
            worst_lines.append(f"| {i} | {s.task} | {r:g} | {li} | {wh['head']} | {t} | {wh['err']:.2f} | "
                               f"{wh['topk_err']:.2f} | {wh['needle']:.2f} | {wh['top']:.2f} | {wh['exact_mass']:.2f} "
                               f"| {wh['group_rank']} / {wh['retrieved']} | {wh['own_rank']} |")
            summary[r] += rows
            if not rows:
                lines.append(f"| {i} | {s.task} | {s.depth:.3f} | {r:g} | 0 | | | | | | | "
                             f"{np.median(err_layers[:, 0]):.3f} | {np.median(err_layers[:, 1]):.3f} | | |")
                continue
            f = lambda key: np.mean([x[key] for x in rows])      # noqa: E731
            lines.append(f"| {i} | {s.task} | {s.depth:.3f} | {r:g} | {len(rows)} | {f('wave'):.2f} | {f('est'):.2f} "
                         f"| {f('topk'):.2f} | {f('n_exact'):.0f} | {np.median([x['rank'] for x in rows]):.0f} "
                         f"| {f('r'):.0f} | {np.median(err_layers[:, 0]):.3f} | {np.median(err_layers[:, 1]):.3f} "
                         f"| {f('next_wave'):.2f} | {f('next_topk'):.2f} |")
            print(lines[-1], flush=True)
    lines += ["", "All prompts together:", "",
              "| r | needle-reading (layer, head, step) | wave exact recall | wave in estimation | top-k recall, same count "
              f"| share of them whose needle cluster ranks within 2x the retrieved count | next digit exact, wave "
              f"| next digit in top-{TOPK} |", "|---|---|---|---|---|---|---|---|"]
    for r, rows in summary.items():
        if rows:
            near = np.mean([0 <= x["rank"] < 2 * x["r"] for x in rows])
            lines.append(f"| {r:g} | {len(rows)} | {np.mean([x['wave'] for x in rows]):.2f} | "
                         f"{np.mean([x['est'] for x in rows]):.2f} | {np.mean([x['topk'] for x in rows]):.2f} | {near:.2f} "
                         f"| {np.mean([x['next_wave'] for x in rows]):.2f} | {np.mean([x['next_topk'] for x in rows]):.2f} |")
    lines += worst_lines
    lines += ["", f"Answer-step attention error per layer (relative to full attention, mean over heads and the digit "
              f"steps, then over prompts), wave vs the exact top-{TOPK} oracle (4 + 64 static):", "",
              "| r | layers where wave's error is larger | median wave error | median top-k error |", "|---|---|---|---|"]
    for r, per in errors.items():
        e = np.mean(np.stack(per), axis=0)                              # (layers, 2)
        lines.append(f"| {r:g} | {int((e[:, 0] > e[:, 1]).sum())} of {len(e)} | {np.median(e[:, 0]):.3f} | "
                     f"{np.median(e[:, 1]):.3f} |")
    lines += ["", f"Total time {time.time() - t0:.0f} s."]
    write_report(args.out, lines, 8)


if __name__ == "__main__":
    main()
