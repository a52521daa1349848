"""RetroInfer wave index: accuracy on real SmolLM2 Q/K and speed at 128K tokens, in one run.

    python benchmarks/wave_index.py [--tokens 4096] [--steps 64] [--speed-n 131072] [--skip-accuracy] [--skip-speed]

Accuracy (all 30 layers): a natural-text prompt of ``--tokens`` tokens; the index is built on all but the
last ``--steps`` positions, which are then decoded one at a time (``append`` the position's K/V, ``attend``
its query). Per layer we report the relative output error ``||o - o_hat|| / ||o||`` against full
attention, recall@100 (the share of each query head's 100 highest-scoring keys that were attended
exactly) and density (fraction of the context read exactly), for

* the wave index (RetroInfer defaults), and the same index with the estimation zone switched off;
* StreamingLLM with the same exact budget (4 sinks + the most recent tokens);
* the exact top-k oracle with the same exact budget (per KV head, the tokens with the largest
  softmax score summed over the GQA group, the wave index's own ranking rule applied to keys).

Speed: synthetic keys at N = ``--speed-n`` (Hkv=8, G=4, d=128, float32): fast ``attend`` vs fast
``full_attention``; fast and reference ``build`` vs NumPy's float32 matmul throughput (k-means
assignment is a matrix product: throughput = assignment FLOPs / build time). Tables go to stdout
and to ``benchmarks/results/wave_index.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from machine import best_of, describe  # noqa: E402

import retrokv.fast as fast  # noqa: E402
import retrokv.reference as ref  # noqa: E402
from retrokv.reference.clustering import kmeans_flops, plan_clusters  # noqa: E402
from retrokv.wave_index import WaveConfig, WaveIndex  # noqa: E402


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def recall_at(scores, exact_ids, k=100):
    """Mean over query heads of |top-k keys ∩ exactly attended| / k; scores (Hkv, G, N)."""
    hits = []
    for h, ids in enumerate(exact_ids):
        top = np.argpartition(-scores[h], min(k, scores.shape[2]) - 1, axis=1)[:, :k]      # (G, k)
        hits.append(np.isin(top, ids).mean())
    return float(np.mean(hits))


def sparse_attend(q, k, v, ids):
    """Exact attention of each KV head's query group over its own token subset ids[h]."""
    hkv = k.shape[0]
    g = q.shape[0] // hkv
    return np.concatenate([fast.full_attention(q[h * g:(h + 1) * g], k[h:h + 1, ids[h]], v[h:h + 1, ids[h]])
                           for h in range(hkv)])


def accuracy(args):
    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import capture_qkv, load_smollm2

    model, tok = load_smollm2()
    cap = capture_qkv(model, natural_text_ids(tok, args.tokens))
    rows, methods = [], ("wave", "wave, no estimation", "StreamingLLM", "top-k oracle")
    for layer in tqdm(sorted(cap), desc="layers"):
        c = cap[layer]
        hkv, n, d = c.k.shape
        g = c.q.shape[0] // hkv
        start = n - args.steps
        idx = WaveIndex.build(c.k[:, :start], c.v[:, :start], config=WaveConfig(), backend="fast")
        noest = WaveIndex.build(c.k[:, :start], c.v[:, :start], config=WaveConfig(estimation=False), backend="fast")
        acc = {m: {"err": [], "recall": [], "density": []} for m in methods}
        for t in range(start, n):
            idx.append(c.k[:, t], c.v[:, t])
            noest.append(c.k[:, t], c.v[:, t])
            k, v, q = c.k[:, :t + 1], c.v[:, :t + 1], c.q[:, t]
            full = fast.full_attention(q, k, v)
            scores = np.einsum("hgd,hnd->hgn", q.reshape(hkv, g, d), k) / np.sqrt(d)   # (Hkv, G, N)
            out = idx.attend(q)
            st = idx.last_stats
            budget = [len(x) for x in st.exact_ids]                  # exact tokens per KV head
            p = np.exp(scores - scores.max(axis=2, keepdims=True))
            rank = (p / p.sum(axis=2, keepdims=True)).sum(axis=1)      # (Hkv, N)
            sets = {
                "wave": (out, st.exact_ids),
                "wave, no estimation": (noest.attend(q), noest.last_stats.exact_ids),
                "StreamingLLM": (None, [np.r_[0:4, t + 1 - (b - 4):t + 1] for b in budget]),
                "top-k oracle": (None, [np.argpartition(-rank[h], b - 1)[:b] for h, b in enumerate(budget)]),
            }
            for m, (o, ids) in sets.items():
                o = sparse_attend(q, k, v, ids) if o is None else o
                acc[m]["err"].append(rel(o, full))
                acc[m]["recall"].append(recall_at(scores, ids))
                acc[m]["density"].append(np.mean([len(x) for x in ids]) / (t + 1))
        rows.append((layer, {m: {s: float(np.mean(x)) for s, x in a.items()} for m, a in acc.items()}))
    return rows, methods



def synthetic_kv(n, repeats, hkv=8, g=4, d=128):
    """The speed benchmark's inputs: ``(k, v, queries, rng)`` with ``repeats + 1`` decode queries. Keys
    have structure (a shared offset, as RoPE'd keys have, plus topic-like directions); seeded."""
    rng = np.random.default_rng(0)
    topics = rng.standard_normal((hkv, 64, d)).astype(np.float32)
    k = np.empty((hkv, n, d), np.float32)
    for h in range(hkv):
        k[h] = topics[h, rng.integers(0, 64, n)] + rng.standard_normal((n, d)).astype(np.float32) + 0.5
    v = rng.standard_normal((hkv, n, d)).astype(np.float32)
    qs = [rng.standard_normal((hkv * g, d)).astype(np.float32) for _ in range(repeats + 1)]
    return k, v, qs, rng


def speed(args):
    n, hkv, g, d = args.speed_n, 8, 4, 128
    k, v, qs, rng = synthetic_kv(n, args.repeats, hkv, g, d)
    res = {}
    a = rng.standard_normal((8192, d)).astype(np.float32)
    b = rng.standard_normal((8192, d)).astype(np.float32)
    t = best_of(lambda: a @ b.T, 5)
    res["matmul_gflops"] = 2 * 8192 * 8192 * d / t / 1e9
    m = n - 4 - 64
    c, s = plan_clusters(m)
    flops = hkv * kmeans_flops(m, c, s, 10, d)
    res["flops"], res["clusters"], res["segments"] = flops, c, s
    print(f"building fast index: {flops / 1e12:.2f} TFLOP of k-means assignment", flush=True)
    t = time.perf_counter()
    idx = WaveIndex.build(k, v, backend="fast")
    res["build_fast"] = time.perf_counter() - t
    it = iter(qs * 100)
    res["attend_fast"] = best_of(lambda: idx.attend(next(it)), args.repeats)
    res["full_fast"] = best_of(lambda: fast.full_attention(qs[0], k, v), args.repeats)
    res["full_ref"] = best_of(lambda: ref.full_attention(qs[0], k, v), 2)
    res["density"] = idx.last_stats.density
    res["bytes"] = idx.last_stats.bytes_read
    o_fast = idx.attend(qs[0])
    meta_fast = idx.meta
    del idx
    if not args.skip_reference_build:
        print("building reference index", flush=True)
        t = time.perf_counter()
        ridx = WaveIndex.build(k, v, backend="reference")
        res["build_ref"] = time.perf_counter() - t
        res["same_clusters"] = all(np.array_equal(x, y) for x, y in zip(ridx.meta, meta_fast))
        res["attend_ref"] = best_of(lambda: ridx.attend(qs[0]), 2)
        res["max_diff"] = float(np.abs(ridx.attend(qs[0]) - o_fast).max())
    return res


def tables(acc_rows, methods, sp, args):
    lines = [f"Machine: {describe()}; load average at the end {os.getloadavg()[0]:.1f}.", ""]
    if acc_rows:
        lines += [f"### Accuracy: SmolLM2-135M, {args.tokens}-token natural-text prompt, last {args.steps} "
                  "positions decoded, every layer (means over steps and heads)", "",
                  "| layer | " + " | ".join(f"{m} err" for m in methods) + " | "
                  + " | ".join(f"{m} recall@100" for m in methods) + " | density |",
                  "|---" * (2 * len(methods) + 2) + "|"]
        for layer, r in acc_rows:
            lines.append(f"| {layer} | " + " | ".join(f"{r[m]['err']:.3f}" for m in methods) + " | "
                         + " | ".join(f"{r[m]['recall']:.3f}" for m in methods) + f" | {r['wave']['density']:.4f} |")
        med = {m: float(np.median([r[m]["err"] for _, r in acc_rows])) for m in methods}
        rec = {m: float(np.median([r[m]["recall"] for _, r in acc_rows])) for m in methods}
        lines.append("| **median** | " + " | ".join(f"**{med[m]:.3f}**" for m in methods) + " | "
                     + " | ".join(f"**{rec[m]:.3f}**" for m in methods) + " | |")
        lines += ["", f"- median error, wave / StreamingLLM: **{med['wave'] / med['StreamingLLM']:.2f}** (target <= 0.5)",
                  f"- median error, wave / wave without estimation: **{med['wave'] / med['wave, no estimation']:.2f}** "
                  "(target < 1)", ""]
    if sp:
        lines += [f"### Speed: synthetic N = {args.speed_n:,}, Hkv=8, G=4, d=128, float32 "
                  f"({sp['clusters']} clusters in {sp['segments']} segments)", "",
                  "| measure | value |", "|---|---|",
                  f"| fast full_attention (ms) | {sp['full_fast'] * 1e3:.1f} |",
                  f"| fast attend (ms) | {sp['attend_fast'] * 1e3:.2f} |",
                  f"| **full_attention / attend (fast)** (target >= 8) | **{sp['full_fast'] / sp['attend_fast']:.1f}x** |",
                  f"| attend density / bytes read | {sp['density']:.4f} / {sp['bytes'] / 2**20:.1f} MiB |",
                  f"| reference full_attention (ms) | {sp['full_ref'] * 1e3:.1f} |",
                  f"| NumPy float32 matmul (GFLOP/s) | {sp['matmul_gflops']:.1f} |",
                  f"| fast build (s) | {sp['build_fast']:.1f} |",
                  f"| fast build throughput (GFLOP/s of assignment) | {sp['flops'] / sp['build_fast'] / 1e9:.1f} |",
                  f"| **fast build / matmul throughput** (target >= 0.5) | "
                  f"**{sp['flops'] / sp['build_fast'] / 1e9 / sp['matmul_gflops']:.2f}** |"]
        if "build_ref" in sp:
            lines += [f"| reference build (s) | {sp['build_ref']:.1f} |",
                      f"| reference / fast build | {sp['build_ref'] / sp['build_fast']:.2f}x |",
                      f"| reference attend (ms) | {sp['attend_ref'] * 1e3:.1f} |",
                      f"| reference / fast attend | {sp['attend_ref'] / sp['attend_fast']:.1f}x |",
                      f"| same clusters (fast vs reference), max abs output diff | {sp['same_clusters']}, "
                      f"{sp['max_diff']:.1e} |"]
    cmd = "python benchmarks/wave_index.py " + " ".join(sys.argv[1:])
    return "\n".join(lines + ["", f"Command: `{cmd.strip()}`", ""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--speed-n", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-reference-build", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "wave_index.md"))
    args = ap.parse_args(argv)
    acc_rows, methods = accuracy(args) if not args.skip_accuracy else ([], ())
    sp = speed(args) if not args.skip_speed else None
    text = tables(acc_rows, methods, sp, args)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
