"""Out-of-distribution retrieval on real SmolLM2 Q/K: recall@100 against % of keys scored, and speed.

    python benchmarks/ood_recall.py [--sizes 4096 8192 16384 32768] [--layers 3 8 14] [--speed-n 32768]

RetrievalAttention §2.4 / Fig. 6: decode queries are out of distribution for the keys, so indexes
built over keys alone (IVF, HNSW) must score many keys to find a query's top-100, while the
attention-aware graph (built with the prefill queries) needs few. One prompt of built-in natural
text is captured once (KV cache, chunks of 2K tokens, the model truncated after the last wanted layer)
and cut into prefixes of each size N: keys 0..N-1 are indexed, queries at 0..N-129 are the prefill
queries, the last 128 positions are the decode queries; the keys of the next 128 tokens (not indexed)
are the "held-out keys" queries. Every query head of every listed layer is measured. Methods: our
graph index (fast; also built with the exact kNN of every prefill query instead of the fast build's
IVF kNN, ``fast.graph_index._IVF_MIN_KEYS`` raised: the before/after of issue 15), our IVF, FAISS
IndexIVFFlat and IndexHNSWFlat (inner product). "Keys scored"
counts inner products with keys during the search (FAISS: its ndis counters; IVF centroids excluded).
SmolLM2 is trained to 8K tokens: sizes beyond that use RoPE positions it never saw (still real Q/K).
Writes benchmarks/results/ood_recall.md, benchmarks/results/ood_recall_speed.md, docs/img/ood_recall.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from machine import describe  # noqa: E402

import retrokv.fast._ivf_knn as fast_ivf  # noqa: E402
from retrokv.baselines import IVFIndex, TopKOracle  # noqa: E402
from retrokv.graph_index import GraphIndex  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
K, N_DECODE, TARGET = 100, 128, 0.95
GRAPH_L = [100, 120, 150, 200, 300, 450, 700, 1000]
IVF_FRAC = [0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6]
HNSW_EF = [100, 150, 200, 300, 500, 800, 1200, 2000, 3000]


def capture_long(n_tokens, layers, chunk=2048):
    """Q (Hq, T, d), K, V (Hkv, T, d) of ``layers`` for ``n_tokens`` of built-in text, chunked with a KV cache."""
    import torch
    from transformers import AttentionInterface, DynamicCache
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import load_smollm2

    model, tok = load_smollm2()
    ids = torch.tensor(natural_text_ids(tok, n_tokens))[None]
    top = max(layers) + 1
    model.model.layers = model.model.layers[:top]          # later layers cannot change these
    model.config.num_hidden_layers = top
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:top]
    qs, kv = {l: [] for l in layers}, {}

    def attn(module, query, key, value, attention_mask, **kw):
        if module.layer_idx in qs:
            qs[module.layer_idx].append(query[0].float().numpy().copy())
            kv[module.layer_idx] = (key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("retrokv_long", attn)
    AttentionMaskInterface.register("retrokv_long", sdpa_mask)   # a causal mask for chunks after the first
    model.set_attn_implementation("retrokv_long")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for s in tqdm(range(0, n_tokens, chunk), desc=f"capture {n_tokens} tokens"):
            model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
    return {l: (np.concatenate(qs[l], 1), kv[l][0][0].float().numpy().copy(), kv[l][1][0].float().numpy().copy())
            for l in layers}


def load_capture(n_tokens, layers):
    path = os.path.expanduser(f"~/.cache/retrokv/ood_{n_tokens}_{'-'.join(map(str, layers))}.npz")
    if os.path.exists(path):
        d = np.load(path)
        return {l: (d[f"{l}_q"], d[f"{l}_k"], d[f"{l}_v"]) for l in layers}
    res = capture_long(n_tokens, layers)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **{f"{l}_{a}": x for l, t3 in res.items() for a, x in zip("qkv", t3)})
    return res


class exact_knn_build:
    """Within this block the fast graph build uses the exact kNN (as before issue 15) at every size."""

    def __enter__(self):
        self.saved = fast_ivf._IVF_MIN_KEYS
        fast_ivf._IVF_MIN_KEYS = 1 << 62

    def __exit__(self, *exc):
        fast_ivf._IVF_MIN_KEYS = self.saved


def recall(ids, truth):
    """Mean |retrieved ∩ exact| / k over (head, query)."""
    a, b = ids.reshape(-1, ids.shape[-1]), truth.reshape(-1, truth.shape[-1])
    return float(np.mean([len(set(x[x >= 0]) & set(y)) / len(y) for x, y in zip(a, b)]))


def faiss_curves(keys, queries, truth, n):
    """FAISS IVFFlat and HNSWFlat (inner product), one index per KV head: {name: [(recall, scanned fraction)]}."""
    import faiss

    hkv, _, d = keys.shape
    g = queries.shape[0] // hkv
    out = {"FAISS IVF": [], "FAISS HNSW": []}
    nlist = round(4 * np.sqrt(n))
    ivfs, hnsws = [], []
    for h in range(hkv):
        quant = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.min_points_per_centroid = 1
        ivf.train(keys[h])
        ivf.add(keys[h])
        hn = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        hn.hnsw.efConstruction = 200
        hn.add(keys[h])
        ivfs.append((ivf, quant))
        hnsws.append(hn)
    nq = queries.shape[0] * queries.shape[1]
    for frac in IVF_FRAC:
        ids, faiss.cvar.indexIVF_stats.ndis = [], 0
        for h in range(queries.shape[0]):
            ivfs[h // g][0].nprobe = max(1, round(frac * nlist))
            ids.append(ivfs[h // g][0].search(queries[h], K)[1])
        out["FAISS IVF"].append((recall(np.stack(ids), truth), faiss.cvar.indexIVF_stats.ndis / nq / n))
    for ef in HNSW_EF:
        ids = []
        faiss.cvar.hnsw_stats.reset()
        for h in range(queries.shape[0]):
            hnsws[h // g].hnsw.efSearch = ef
            ids.append(hnsws[h // g].search(queries[h], K)[1])
        out["FAISS HNSW"].append((recall(np.stack(ids), truth), faiss.cvar.hnsw_stats.ndis / nq / n))
    return out


def at_target(curve, target=TARGET):
    """Fraction of keys scored to reach ``target`` recall: linear interpolation between the two sweep
    points around it (None if the sweep never reaches it)."""
    prev = (0.0, 0.0)
    for r, s in sorted(curve, key=lambda p: p[1]):
        if r >= target:
            r0, s0 = prev
            return s0 + (s - s0) * (target - r0) / (r - r0) if r0 < target else s
        prev = (r, s)
    return None


def measure(caps, n, layers):
    """Recall curves at size n for both query kinds, pooled over layers and query heads."""
    curves = {kind: {} for kind in ("decode queries", "held-out keys")}
    for layer in layers:
        q, k, v = caps[layer]
        keys, values = np.ascontiguousarray(k[:, :n]), np.ascontiguousarray(v[:, :n])
        g = q.shape[0] // k.shape[0]
        queries = {"decode queries": np.ascontiguousarray(q[:, n - N_DECODE:n]),
                   "held-out keys": np.ascontiguousarray(np.repeat(k[:, n:n + N_DECODE], g, axis=0))}
        graph = GraphIndex.build(keys, values, q[:, :n - N_DECODE], n_sink=0, n_recent=0, backend="fast")
        with exact_knn_build():
            graph_x = GraphIndex.build(keys, values, q[:, :n - N_DECODE], n_sink=0, n_recent=0, backend="fast")
        ivf = IVFIndex.build(keys, values, n_sink=0, n_recent=0, backend="fast")
        exact = TopKOracle.build(keys, values, n_sink=0, n_recent=0, backend="fast")
        for kind, qq in queries.items():
            truth, _ = exact.search(qq, K)
            c = curves[kind]
            for name, gi in (("graph (ours)", graph), ("graph, exact-kNN build", graph_x)):
                for L in GRAPH_L:
                    ids, sc = gi.search(qq, K, L=L)
                    c.setdefault((name, L), []).append((recall(ids, truth), sc.mean() / n))
            for frac in IVF_FRAC:
                ids, sc = ivf.search(qq, K, nprobe=max(1, round(frac * ivf.n_lists)))
                c.setdefault(("IVF (ours)", frac), []).append((recall(ids, truth), sc.mean() / n))
            for name, pts in faiss_curves(keys, qq, truth, n).items():
                for i, p in enumerate(pts):
                    c.setdefault((name, i), []).append(p)
    # pool layers: mean recall and mean fraction at each sweep point
    return {kind: _by_method({key: tuple(np.mean(v, axis=0)) for key, v in c.items()}) for kind, c in curves.items()}


def _by_method(points):
    out = {}
    for (name, _), p in points.items():
        out.setdefault(name, []).append(p)
    return out


def speed(caps, n, layer, ref_heads, repeats=3):
    """Build and search time at size n: fast vs reference vs FAISS HNSW (one head's graph / index)."""
    import faiss

    q, k, v = caps[layer]
    keys, values = np.ascontiguousarray(k[:, :n]), np.ascontiguousarray(v[:, :n])
    hq, hkv = q.shape[0], k.shape[0]
    g = hq // hkv
    pq, dq = q[:, :n - N_DECODE], np.ascontiguousarray(q[:, n - N_DECODE:n])
    rows = {}
    GraphIndex.build(keys[:, :2000], values[:, :2000], pq[:, :1000], n_sink=0, n_recent=0, backend="fast")  # JIT warm-up
    t = time.perf_counter()
    fast = GraphIndex.build(keys, values, pq, n_sink=0, n_recent=0, backend="fast")
    rows["fast build (s per head)"] = (time.perf_counter() - t) / hq
    with exact_knn_build():
        t = time.perf_counter()
        GraphIndex.build(keys, values, pq, n_sink=0, n_recent=0, backend="fast")
        rows["fast build, exact kNN (s per head)"] = (time.perf_counter() - t) / hq
    sub = slice(0, ref_heads)
    t = time.perf_counter()
    ref = GraphIndex.build(keys[:1], values[:1], pq[sub], n_sink=0, n_recent=0, backend="reference")
    rows["reference build (s per head)"] = (time.perf_counter() - t) / ref_heads
    # the fast build's IVF kNN is approximate above fast_ivf._IVF_MIN_KEYS keys: the graphs differ
    # from the reference's; share of the reference graph's edges that the fast graph also has
    fa, ra = fast.adj[sub], ref.adj
    shared = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for x, y in zip(fa, ra) for a, b in zip(x, y))
    rows["reference-graph edges also in the fast graph (%)"] = 100 * shared / max(int((ra >= 0).sum()), 1)
    truth, _ = TopKOracle.build(keys, values, n_sink=0, n_recent=0, backend="fast").search(dq, K)
    L = next((L for L in GRAPH_L if recall(fast.search(dq, K, L=L)[0], truth) >= TARGET), GRAPH_L[-1])
    ids, sc = fast.search(dq, K, L=L)
    rows[f"fast-built graph, heads {sub.start}..{sub.stop - 1}: recall@100 (L={L})"] = recall(ids[sub], truth[sub])
    rows[f"fast-built graph, heads {sub.start}..{sub.stop - 1}: keys scored (%)"] = 100 * sc[sub].mean() / n
    ids, sc = ref.search(dq[sub], K, L=L)
    rows[f"reference-built graph, same heads: recall@100 (L={L})"] = recall(ids, truth[sub])
    rows["reference-built graph, same heads: keys scored (%)"] = 100 * sc.mean() / n
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        ids, _ = fast.search(dq, K, L=L)
        best.append((time.perf_counter() - t) / (hq * N_DECODE))
    rows["fast search (ms per query)"] = min(best) * 1e3
    rows[f"fast search recall@100 (L={L})"] = recall(ids, truth)
    nref = 8
    t = time.perf_counter()
    ref.search(dq[sub, :nref], K, L=L)
    rows["reference search (ms per query)"] = (time.perf_counter() - t) / (ref_heads * nref) * 1e3
    t = time.perf_counter()
    hns = []
    for h in range(hkv):
        hn = faiss.IndexHNSWFlat(keys.shape[2], 32, faiss.METRIC_INNER_PRODUCT)
        hn.hnsw.efConstruction = 200
        hn.add(keys[h])
        hns.append(hn)
    rows["FAISS HNSW build (s per KV head)"] = (time.perf_counter() - t) / hkv

    def hnsw_search(ef):
        for hn in hns:
            hn.hnsw.efSearch = ef
        return np.stack([hns[h // g].search(dq[h], K)[1] for h in range(hq)])

    ef = next((e for e in HNSW_EF if recall(hnsw_search(e), truth) >= TARGET), HNSW_EF[-1])
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        ids = hnsw_search(ef)
        best.append((time.perf_counter() - t) / (hq * N_DECODE))
    rows["FAISS HNSW search (ms per query)"] = min(best) * 1e3
    rows[f"FAISS HNSW search recall@100 (efSearch={ef})"] = recall(ids, truth)
    return rows


def plot(results, n, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (kind, methods) in zip(axes, results[n].items()):
        for name, pts in methods.items():
            pts = sorted(pts, key=lambda p: p[1])
            ax.plot([100 * p[1] for p in pts], [p[0] for p in pts], marker="o", ms=3, label=name)
        ax.axhline(TARGET, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("% of keys scored")
        ax.set_title(f"{kind}, N = {n:,}")
    axes[0].set_ylabel("recall@100")
    axes[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 8, 14])
    ap.add_argument("--speed-n", type=int, default=32768)
    ap.add_argument("--ref-heads", type=int, default=1, help="heads built by the (slow) reference in the speed part")
    ap.add_argument("--speed-only", action="store_true", help="only the speed part (ood_recall_speed.md)")
    args = ap.parse_args(argv)
    total = max(max(args.sizes), args.speed_n) + N_DECODE
    caps = load_capture(total, args.layers)
    if args.speed_only:
        return speed_part(caps, args, argv)
    results = {n: measure(caps, n, args.layers) for n in tqdm(args.sizes, desc="sizes")}
    methods = ["graph (ours)", "graph, exact-kNN build", "IVF (ours)", "FAISS IVF", "FAISS HNSW"]
    fmt = lambda x: "never" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    lines = [f"Recall@100 of SmolLM2-135M Q/K (layers {', '.join(map(str, args.layers))}, all 9 query heads, "
             f"{N_DECODE} queries each): % of keys scored to reach recall@100 = {TARGET} (interpolated along each "
             f"sweep). Machine: {describe()}.", ""]
    for kind in ("decode queries", "held-out keys"):
        lines += [f"**{kind}**", "", "| N | " + " | ".join(methods) + " | IVF / graph | FAISS IVF / graph | HNSW / graph |",
                  "|---" * (len(methods) + 4) + "|"]
        for n in args.sizes:
            at = {m: at_target(results[n][kind][m]) for m in methods}
            g = at["graph (ours)"]
            ratio = lambda m: "-" if (g is None or at[m] is None) else f"{at[m] / g:.1f}x"  # noqa: E731
            lines.append(f"| {n:,} | " + " | ".join(fmt(at[m]) for m in methods)
                         + f" | {ratio('IVF (ours)')} | {ratio('FAISS IVF')} | {ratio('FAISS HNSW')} |")
        lines.append("")
    lines.append("Command: `python benchmarks/ood_recall.py " + " ".join(argv or sys.argv[1:]) + "`")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ood_recall.md"), "w") as f:
        f.write(table + "\n")
    plot(results, max(args.sizes), os.path.join(HERE, "..", "docs", "img", "ood_recall.png"))
    speed_part(caps, args, argv)


def speed_part(caps, args, argv):
    rows = speed(caps, args.speed_n, args.layers[len(args.layers) // 2], args.ref_heads)
    sp = [f"Graph index speed at N = {args.speed_n:,}, layer {args.layers[len(args.layers) // 2]} (9 query heads, "
          f"3 KV heads, d = 64), {N_DECODE} decode queries per head, search in parallel over (head, query); "
          f"reference build timed on {args.ref_heads} head(s). Machine: {describe()}.", "",
          "| measure | value |", "|---|---|"]
    sp += [f"| {k} | {v:.3g} |" for k, v in rows.items()]
    sp += ["", f"fast vs reference: build {rows['reference build (s per head)'] / rows['fast build (s per head)']:.1f}x, "
           f"search {rows['reference search (ms per query)'] / rows['fast search (ms per query)']:.1f}x faster; "
           f"fast search / FAISS HNSW search time at recall 0.95: "
           f"{rows['fast search (ms per query)'] / rows['FAISS HNSW search (ms per query)']:.2f}",
           "", "Command: `python benchmarks/ood_recall.py " + " ".join(argv or sys.argv[1:]) + "`"]
    speed_table = "\n".join(sp)
    print(speed_table)
    with open(os.path.join(HERE, "results", "ood_recall_speed.md"), "w") as f:
        f.write(speed_table + "\n")


if __name__ == "__main__":
    main()
