"""Graph index build time (RetrievalAttention, default ``GraphConfig``: ALL prefill queries) on SmolLM2
at 8K tokens against the dense prefill of the same prompt, old (exact kNN) vs new (IVF kNN) fast kernels,
in one run (issue 15 item 1). Writes ``benchmarks/results/graph_build.md``.

    python benchmarks/graph_build.py [--tokens 8192] [--old-layers 30] [--out benchmarks/results/graph_build.md]

1. Dense prefill of ``--tokens`` tokens of built-in natural text through SmolLM2-135M (torch's SDPA
   through ``retrokv.hf``, keeping every layer's Q/K/V: the harness's shared prefill, what ``make demo`` runs).
2. Profile of one query head (layer 15, head 0; its KV head's ``key_neighbors`` and IVF layout included)
   per build stage, old and new kernels side by side, and inside the old exact ``knn`` of the prefill
   queries the BLAS matmul vs the top-k selection.
3. The graph index of all 30 layers built from the saved prefill (``hf.attach(model, "graph")`` +
   ``rebuild``, the user's path) with the new kernels, and with the old ones (``load_old``:
   ``fast/graph_index.py`` as of main before this change: exact kNN) on the first ``--old-layers``
   layers; the graphs of both are compared (share of the old graphs' edges that the new graphs have,
   equal entry points). Search quality of the two builds: ``benchmarks/ood_recall.py``. An ablation on
   the same layers: the new kernels with the IVF kNN's BLAS calls multithreaded (see
   ``retrokv.fast._dispatch.blas_one_thread``).
4. The dense prefill again, after the builds: machine speed drifts over minutes on a shared host, so
   the build is compared with the faster of the two prefills.

All timings are wall-clock on a shared machine: the load average is recorded before and after; compare
the ratios, which are measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from machine import describe  # noqa: E402

import retrokv.fast.graph_index as new_impl  # noqa: E402
from retrokv import GraphConfig  # noqa: E402
from retrokv.harness import eval as E  # noqa: E402


OLD_REV = "8172b9b"      # main before the IVF kNN build (exact kNN of every prefill query)


def load_old(rev=OLD_REV):
    """``fast/graph_index.py`` as of ``rev``, read from git and loaded as a module: the old kernels timed in
    the same run as the new ones, without a copy of them in the tree (Numba's disk cache needs a file, so
    it is off for these)."""
    import subprocess
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:fast/graph_index.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    src = (src.replace("from ..reference", "from retrokv.reference").replace("from ._dispatch", "from retrokv.fast._dispatch")
           .replace("from .baselines", "from retrokv.fast.baselines").replace("from ._topk", "from retrokv.fast._topk").replace("cache=True", "cache=False"))
    mod = types.ModuleType("graph_index_old")
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:fast/graph_index.py", "exec"), mod.__dict__)
    return mod


def load():
    return "load average %.1f / %.1f / %.1f (1/5/15 min)" % os.getloadavg()


@contextmanager
def kernels(impl):
    """Make the fast backend's graph build use ``impl``'s kernels (the public path looks them up at call)."""
    saved = new_impl.key_neighbors, new_impl.build_graph
    new_impl.key_neighbors, new_impl.build_graph = impl.key_neighbors, impl.build_graph
    try:
        yield
    finally:
        new_impl.key_neighbors, new_impl.build_graph = saved


@contextmanager
def blas_spinning():
    """The IVF kNN with its BLAS calls on every BLAS thread, as before ``blas_one_thread``: OpenBLAS's
    workers then still spin when the parallel scan starts (the ablation row of the table)."""
    import contextlib

    saved = new_impl._ivf.blas_one_thread
    new_impl._ivf.blas_one_thread = contextlib.nullcontext
    try:
        yield
    finally:
        new_impl._ivf.blas_one_thread = saved


def timed(f, *a, **kw):
    t = time.perf_counter()
    r = f(*a, **kw)
    return r, time.perf_counter() - t


def profile_head(impl, q, keys, cfg):
    """Seconds per stage for one query head (plus its KV head's key kNN)."""
    t = {"IVF layout: k-means (per KV head)": 0.0}
    ivf = getattr(impl, "_ivf", None)                     # the IVF kNN module (new kernels only)
    if ivf is not None:
        ivf._layout_cache.clear()
        t["IVF layout: k-means (per KV head)"] = timed(ivf._layout, keys)[1]
    knbrs, t["key_neighbors (per KV head)"] = timed(impl.key_neighbors, keys, cfg.max_degree)
    entry = impl.entry_point(keys)
    nbrs, t["knn (prefill queries)"] = timed(impl.knn, q, keys, cfg.n_query_neighbors)
    adj, t["project"] = timed(impl.project, nbrs, keys, cfg.max_degree, cfg.pool_cap, cfg.metric)
    adj, t["reverse edges"] = timed(impl.add_reverse_edges, adj, keys, cfg.metric)
    adj, t["enhance"] = timed(impl.enhance, adj, keys, knbrs, cfg.metric)
    adj, t["connect"] = timed(impl.connect, adj, knbrs, entry)
    return t, adj


def knn_split(q, keys, k, block):
    """Inside the exact knn of the prefill queries: BLAS matmul vs selection, select_topk and fused."""
    from retrokv.fast._topk import select_block
    from retrokv.fast.baselines import select_topk

    mm = s_old = s_new = 0.0
    out = np.empty((len(q), k), dtype=np.int64)
    zero = np.zeros(1, dtype=np.float32)
    for s in range(0, len(q), block):
        scores, dt = timed(lambda: q[s:s + block] @ keys.T)
        mm += dt
        s_old += timed(select_topk, scores, k)[1]
        s_new += timed(select_block, scores, k, zero, False, np.int64(s), False, out, np.int64(s))[1]
    return mm, s_old, s_new


def build_all(model, saved, layers, impl):
    from retrokv import hf

    with kernels(impl):
        h = hf.attach(model, "graph", GraphConfig(), "fast")
        try:
            _, secs = timed(h.rebuild, {layer: saved[layer] for layer in layers})
            graphs = {layer: [(ix.adj.copy(), ix.entry.copy()) for ix in h.indexes[layer] if hasattr(ix, "adj")]
                      for layer in layers}
        finally:
            hf.detach(model)
    return secs, graphs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--old-layers", type=int, default=30, help="layers built with the old kernels (first N)")
    ap.add_argument("--out", default="benchmarks/results/graph_build.md")
    args = ap.parse_args()

    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import load_smollm2

    load0 = load()
    old_impl = load_old()
    # compile every kernel of both implementations first (Numba caches; not timed)
    rng = np.random.default_rng(0)
    wq, wk = rng.standard_normal((300, 64)).astype(np.float32), rng.standard_normal((400, 64)).astype(np.float32)
    for impl in (old_impl, new_impl):
        impl.build_graph(wq, wk, 20, 8, 40, "l2", knbrs=impl.key_neighbors(wk, 8))
    wk = rng.standard_normal((3000, 64)).astype(np.float32)        # large enough for the IVF path
    new_impl.build_graph(wq, wk, 20, 8, 40, "l2", knbrs=new_impl.key_neighbors(wk, 8))
    knn_split(wq, wk, 20, 128)

    model, tok = load_smollm2()
    ids = natural_text_ids(tok, args.tokens)
    _, saved, prefill_s = E.shared_prefill(model, ids, "fast")
    print(f"dense prefill {prefill_s:.1f} s", flush=True)
    layers = sorted(saved)

    cfg = GraphConfig()
    q, k = saved[15][0], saved[15][1]                     # (1, Hq, T, d), (1, Hkv, T, d)
    keys = np.ascontiguousarray(k[0, 0, cfg.n_sink:k.shape[2] - cfg.n_recent], dtype=np.float32)
    qh = np.ascontiguousarray(q[0, 0], dtype=np.float32)
    prof = {}
    for name, impl in (("old", old_impl), ("new", new_impl)):
        prof[name], adj = profile_head(impl, qh, keys, cfg)
        prof[name + "_adj"] = adj
    split = knn_split(qh, keys, cfg.n_query_neighbors, new_impl._BLOCK)
    print(prof["old"], prof["new"], split, flush=True)

    new_impl._ivf._scans.clear()
    new_s, new_g = build_all(model, saved, layers, new_impl)
    scans = np.array(new_impl._ivf._scans)                    # per IVF kNN call: fraction of keys scanned
    print(f"new build, {len(layers)} layers: {new_s:.1f} s", flush=True)
    old_layers = layers[:args.old_layers]
    new_sub_s = new_s if len(old_layers) == len(layers) else build_all(model, saved, old_layers, new_impl)[0]
    with blas_spinning():
        spin_s = build_all(model, saved, old_layers, new_impl)[0]
    print(f"new build with multithreaded BLAS in the IVF kNN, {len(old_layers)} layers: {spin_s:.1f} s", flush=True)
    old_s, old_g = build_all(model, saved, old_layers, old_impl)
    print(f"old build, {len(old_layers)} layers: {old_s:.1f} s", flush=True)
    shared = total = 0
    same_entry = True
    for layer in old_layers:
        for a, b in zip(new_g[layer], old_g[layer]):
            same_entry &= bool(np.array_equal(a[1], b[1]))
            for x, y in zip(a[0].reshape(-1, a[0].shape[-1]), b[0].reshape(-1, b[0].shape[-1])):
                shared += len(np.intersect1d(x[x >= 0], y[y >= 0]))
                total += int((y >= 0).sum())
    del saved, new_g, old_g
    _, _, prefill2_s = E.shared_prefill(model, ids, "fast")      # the same prefill again, after the builds
    print(f"dense prefill again {prefill2_s:.1f} s", flush=True)
    base_s = min(prefill_s, prefill2_s)
    load1 = load()

    rows = [{"stage": s, "old_s": prof["old"][s], "new_s": prof["new"][s],
             "speedup": prof["old"][s] / max(prof["new"][s], 1e-9)} for s in prof["old"]]
    tot_o, tot_n = sum(prof["old"].values()), sum(prof["new"].values())
    rows.append({"stage": "total", "old_s": tot_o, "new_s": tot_n, "speedup": tot_o / tot_n})
    mm, s_old, s_new = split
    rows2 = [{"part of knn (prefill queries)": "BLAS matmul (1024-row blocks, as the reference)", "seconds": mm},
             {"part of knn (prefill queries)": "top-k selection, old (select_topk after scores += bias)", "seconds": s_old},
             {"part of knn (prefill queries)": "top-k selection, fused (_topk.select_block)", "seconds": s_new}]
    n_kv, n_q = k.shape[1], q.shape[1]
    rows3 = [{"what": "dense prefill (torch SDPA through retrokv.hf, Q/K/V kept), before the builds",
              "layers": len(layers), "seconds": prefill_s, "vs_prefill": prefill_s / base_s},
             {"what": "the same dense prefill, after the builds", "layers": len(layers), "seconds": prefill2_s,
              "vs_prefill": prefill2_s / base_s},
             {"what": "graph build, new kernels (IVF kNN)", "layers": len(layers), "seconds": new_s,
              "vs_prefill": new_s / base_s}]
    if len(old_layers) != len(layers):
        rows3.append({"what": "graph build, new kernels (IVF kNN)", "layers": len(old_layers), "seconds": new_sub_s,
                      "vs_prefill": float("nan")})
    rows3.append({"what": "graph build, new kernels, IVF kNN's BLAS calls multithreaded (ablation)",
                  "layers": len(old_layers), "seconds": spin_s,
                  "vs_prefill": spin_s / base_s if len(old_layers) == len(layers) else float("nan")})
    rows3.append({"what": f"graph build, old kernels (main {OLD_REV}, exact kNN)", "layers": len(old_layers), "seconds": old_s,
                  "vs_prefill": old_s / base_s if len(old_layers) == len(layers) else float("nan")})
    with open(args.out, "w") as f:
        f.write(f"# Graph index build with all prefill queries vs dense prefill (SmolLM2-135M, CPU)\n\n"
                f"Command: `python benchmarks/graph_build.py {' '.join(sys.argv[1:])}`  \n"
                f"Machine: {describe()}  \nContention: shared with other jobs; {load0} at start, {load1} at "
                f"the end. Wall-clock seconds; old and new are timed in the same run, so compare ratios; "
                f"`vs_prefill` divides by the faster of the two prefills (one before, one after the builds).  \n"
                f"{args.tokens}-token natural-text prompt, `GraphConfig()` defaults (`build_queries=None`: all "
                f"{q.shape[2]} prefill queries per head; {len(keys)} indexed keys per head), "
                f"{n_q} query heads / {n_kv} KV heads per layer.\n\n"
                f"## Whole model: build vs dense prefill\n\n" + E.markdown_table(rows3, list(rows3[0])) +
                f"\n\nEdges of the old (exact-kNN) graphs that the new graphs also have, every head of the "
                f"{len(old_layers)} layers built both ways: **{100 * shared / max(total, 1):.1f}%**; same entry "
                f"points: **{same_entry}**. Search recall of both builds at equal keys scored: "
                f"`benchmarks/results/ood_recall.md`.\n\n"
                f"Fraction of the keys each IVF kNN of the new build scanned (after its self-check; "
                f"{len(scans)} calls: 1 key kNN per KV head, 1 query kNN per query head, every layer): "
                + ", ".join(f"{v:.3g}: {c}" for v, c in zip(*np.unique(np.round(scans, 3), return_counts=True)))
                + ".\n\n"
                f"## Profile of one query head (layer 15, head 0)\n\n" + E.markdown_table(rows, list(rows[0])) +
                "\n\nThe IVF layout and `key_neighbors` run once per KV head (shared by its query heads); the "
                "other stages once per query head.\n\n" + E.markdown_table(rows2, list(rows2[0])) + "\n")
    print(open(args.out).read())


if __name__ == "__main__":
    main()
