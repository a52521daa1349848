"""LazyAttention on a RAG workload: cache capacity by formula and simulation, then SmolLM2 end to end.

    python benchmarks/lazy_rag.py [--requests 36] [--pool 30] [--budget 1200] [--alphas 1.2 0]

Part 1 (capacity, LazyAttention §5): Zipf(alpha) document popularity, D positions, a budget of C
document-KV entries. A position-agnostic cache holds the top C documents; a position-aware one needs a
copy per (document, position), so it holds the top floor(C/D) documents at every position.
Hit-ratio ratio = sum_{i<=C} i^-alpha / sum_{i<=floor(C/D)} i^-alpha (2.86x at D=20, C=100, alpha=0.85),
checked by Monte Carlo with the same static caches and with LRU caches.

Part 2 (SmolLM2 RAG): a pool of synthetic fact documents; each request draws 3-5 documents by Zipf and
asks about a fact in one of them. Time to first token of: full re-prefill; prefix caching (exact
KV of whole-document prefixes, LRU); Block-Attention (a position-aware cache of materialised copies:
re-rotated from a copy at another offset, or prefilled alone on a miss); lazy reuse (one copy per
document, re-positioned inside attention). Both caches get the same token budget. Accuracy: greedy
answer contains the fact's number; agreement: same answer as full re-prefill.
Writes the tables to benchmarks/results/lazy_rag.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from machine import best_of, describe  # noqa: E402


# ---- part 1: capacity ------------------------------------------------------------------------------
def harmonic(n, alpha):
    return float((np.arange(1, n + 1, dtype=np.float64) ** -alpha).sum()) if n > 0 else 0.0


def formula_ratio(alpha, capacity, positions):
    return harmonic(capacity, alpha) / harmonic(capacity // positions, alpha)


def simulate(alpha, capacity, positions, n_docs=1000, draws=200_000, seed=0):
    """Hit ratios of static top-k caches (the formula's assumption) and LRU caches, agnostic vs aware."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_docs + 1, dtype=np.float64) ** -alpha
    docs = rng.choice(n_docs, size=draws, p=p / p.sum())             # rank 0 = most popular
    pos = rng.integers(0, positions, size=draws)
    static_agnostic = float((docs < capacity).mean())
    static_aware = float((docs < capacity // positions).mean())
    lru = []
    for keys in (docs, docs * positions + pos):
        cache, hits = OrderedDict(), 0
        for x in keys.tolist():
            if x in cache:
                hits += 1
                cache.move_to_end(x)
            else:
                cache[x] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
        lru.append(hits / draws)
    return static_agnostic, static_aware, lru[0], lru[1]


def capacity_table(positions=20, capacity=100):
    rows = ["| alpha | formula ratio | static agnostic hit | static aware hit | simulated ratio | LRU agnostic hit | LRU aware hit | LRU ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for alpha in tqdm([0.85, 1.2, 2.1], desc="capacity simulation"):
        sa, sw, la, lw = simulate(alpha, capacity, positions)
        rows.append(f"| {alpha} | {formula_ratio(alpha, capacity, positions):.2f}x | {sa:.3f} | {sw:.3f} | "
                    f"{sa / sw:.2f}x | {la:.3f} | {lw:.3f} | {la / lw:.2f}x |")
    return rows


# ---- part 3: attention kernels alone -------------------------------------------------------------
def kernel_table(n_docs=5, doc_len=2048, t=32, hkv=3, g=3, d=64, repeats=5):
    """Per-layer attention of a request (SmolLM2 heads): lazy vs keys already in place vs Block-Attention."""
    import retrokv as rk
    from retrokv.lazy import DocumentStore, LazyConfig

    rng = np.random.default_rng(0)
    rows = ["| step | same kernel, keys pre-positioned (no rotation) | LazyAttention (rotate inside) | lazy rotation overhead "
            "| Block-Attention (materialise + core attention) | core attention on pre-positioned keys | Block / lazy |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    store = DocumentStore(LazyConfig(theta=1e5), backend="fast")
    docs = []
    for i in range(n_docs):
        toks = list(range(i * doc_len, (i + 1) * doc_len))
        k = rk.apply_rope(rng.standard_normal((hkv, doc_len, d)).astype(np.float32), np.arange(doc_len), theta=1e5)
        store.put(toks, k, rng.standard_normal((hkv, doc_len, d)).astype(np.float32))
        docs.append(toks)
    req = store.request(docs[::-1], start=32)
    k_mat, v_mat = store.materialize(req)                                   # positioned keys, made once
    kt = rng.standard_normal((hkv, t, d)).astype(np.float32)
    vt = rng.standard_normal((hkv, t, d)).astype(np.float32)
    k_all, v_all = np.concatenate([k_mat, kt], 1), np.concatenate([v_mat, vt], 1)
    fixed = DocumentStore(LazyConfig(theta=1e5), backend="fast")           # a position-aware copy
    k_mat4, v_mat4 = k_mat[None], v_mat[None]
    fixed.put(list(range(k_mat.shape[1])), k_mat4, v_mat4)
    req_fixed = fixed.request([list(range(k_mat.shape[1]))], start=32, positioned=True)
    for name, q in (("prefill (32 question tokens)", rng.standard_normal((hkv * g, t, d)).astype(np.float32)),
                    ("decode (1 token)", rng.standard_normal((hkv * g, d)).astype(np.float32))):
        causal = q.ndim == 3
        core = best_of(lambda: rk.partial_attention(q, k_all, v_all, causal=causal, backend="fast"), repeats)
        run = "prefill_attention" if causal else "decode_attention"
        same = best_of(lambda: getattr(fixed, run)(req_fixed, q, kt, vt), repeats)
        lazy = best_of(lambda: getattr(store, run)(req, q, kt, vt), repeats)
        block = best_of(lambda: store.block_attention(req, q, kt, vt), repeats)
        rows.append(f"| {name} | {1e3 * same:.2f} ms | {1e3 * lazy:.2f} ms | {100 * (lazy / same - 1):+.1f}% | "
                    f"{1e3 * block:.2f} ms | {1e3 * core:.2f} ms | {block / lazy:.2f}x |")
    return rows


# ---- part 2: SmolLM2 RAG ---------------------------------------------------------------------------
def draw_requests(rng, n_pool, n_requests, alpha):
    p = np.arange(1, n_pool + 1, dtype=np.float64) ** -alpha
    out = []
    for _ in range(n_requests):
        k = int(rng.integers(3, 6))
        docs = rng.choice(n_pool, size=k, replace=False, p=p / p.sum())     # order of drawing = order in prompt
        out.append((docs.tolist(), int(rng.choice(docs))))
    return out


def run_workload(system, pool, alpha, n_requests, warmup, seed):
    rng = np.random.default_rng(seed)
    reqs = draw_requests(rng, len(pool.docs), n_requests, alpha)
    system.reset()
    methods = system.METHODS
    ttft = {m: [] for m in methods}
    correct = {m: [] for m in methods}
    agree = {m: [] for m in methods}
    for i, (docs, target) in enumerate(tqdm(reqs, desc=f"alpha={alpha}")):
        answers = {}
        for m in methods:
            t, text = system.serve(m, docs, target)
            answers[m] = text
            if i >= warmup:
                ttft[m].append(t)
                correct[m].append(pool.answers[target] in text)
        if i >= warmup:
            for m in methods:
                agree[m].append(answers[m] == answers["full"])
    stats = system.hit_stats()
    return {m: (np.mean(ttft[m]), np.mean(correct[m]), np.mean(agree[m])) for m in methods}, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=36)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--pool", type=int, default=30)
    ap.add_argument("--budget", type=int, default=1200, help="cache budget in tokens (per cache)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[1.2, 0.0])
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="only the attention-kernel table (lazy_rag_kernels.md)")
    args = ap.parse_args()
    command = "Command: `python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "`"
    if args.kernels:
        lines = ["# LazyAttention: attention kernels alone (one layer, SmolLM2 heads Hkv=3, G=3, d=64; "
                 "5 documents x 2048 tokens)", "", f"Machine: {describe()}", "", command, ""] + kernel_table()
        print("\n".join(lines))
        with open(os.path.join(os.path.dirname(__file__), "results", "lazy_rag_kernels.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        return

    lines = ["# LazyAttention: capacity and RAG time to first token", "", f"Machine: {describe()}", "",
             "Command: `python benchmarks/" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "`", "",
             "## Capacity (D = 20 positions, C = 100 entries, pool of 1000 documents, 200k draws)", ""]
    lines += capacity_table()
    print("\n".join(lines))
    if not args.skip_model:
        from lazy_rag_model import RAGSystem, build_pool   # loads torch/transformers only when needed

        pool = build_pool(args.pool)
        system = RAGSystem(pool, budget=args.budget)
        lines += ["", f"## SmolLM2-135M RAG: {args.pool} documents of ~{pool.mean_tokens:.0f} tokens, 3-5 per request, "
                  f"{args.requests} requests ({args.warmup} warm-up not counted), cache budget {args.budget} tokens", ""]
        for alpha in args.alphas:
            res, stats = run_workload(system, pool, alpha, args.requests, args.warmup, seed=1)
            name = "uniform" if alpha == 0 else f"Zipf alpha={alpha}"
            lines += [f"### {name}", "",
                      "| method | TTFT (ms) | vs full | vs Block-Attention | answer accuracy | same answer as full |",
                      "|---|---:|---:|---:|---:|---:|"]
            for m, (t, acc, agr) in res.items():
                lines.append(f"| {system.LABELS[m]} | {1e3 * t:.1f} | {res['full'][0] / t:.2f}x | "
                             f"{res['block'][0] / t:.2f}x | {100 * acc:.0f}% | {100 * agr:.0f}% |")
            lines += ["", "Cache behaviour: " + ", ".join(f"{k} {v}" for k, v in stats.items()), ""]
            print("\n".join(lines[-len(res) - 6:]))
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "lazy_rag.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
