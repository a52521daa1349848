"""A wave-index decode step with its metadata cold, on 4 KiB pages vs on transparent huge pages.

In a whole-model decode step each layer's index is read cold: the model's weights evict it between two
steps of the layer. This benchmark reproduces that without the model: 30 copies of one 32K-token index
(30 "layers", ~90 MB together, more than the last-level cache) are stepped in turn, so every step finds
its index out of the caches, once with the metadata as separate NumPy arrays (4 KiB pages: NumPy asks
for huge pages only from 4 MiB up) and once packed by :func:`retrokv.fast._wave_build._on_huge_pages`
(what ``build_meta_index`` now returns). Same kernel, same values; the rounds alternate the two.

    python benchmarks/wave_step_cold.py [--tokens 32768] [--rounds 6] [--out benchmarks/results/wave_step_cold.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="benchmarks/results/wave_step_cold.md")
    args = ap.parse_args()
    import numba as nb

    import retrokv.fast._wave_build as fb
    import retrokv.fast.wave_index as fw
    from retrokv.harness.eval import markdown_table
    from retrokv.wave_index import WaveIndex

    nb.set_num_threads(1)                         # a decode step of this size runs on one thread (threads_for)
    rng = np.random.default_rng(0)
    hkv, d, hq = 3, 64, 9                         # SmolLM2-135M's attention shape
    k = rng.standard_normal((hkv, args.tokens, d)).astype(np.float32)
    k += 2 * rng.standard_normal((hkv, 1, d)).astype(np.float32)
    v = rng.standard_normal((hkv, args.tokens, d)).astype(np.float32)
    idx = WaveIndex.build(k, v, backend="fast")
    sk, sv, sids = idx.steady
    small = ("centroids", "value_sums", "sizes", "offsets", "ids")
    layouts = {"4 KiB pages": [], "huge pages": []}
    for _ in range(args.layers):                  # fresh copies per layer: separate pages
        plain = idx.meta._replace(**{f: np.array(getattr(idx.meta, f)) for f in small},
                                  keys=idx.meta.keys.copy(), values=idx.meta.values.copy())
        layouts["4 KiB pages"].append(plain)
        layouts["huge pages"].append(fb._on_huge_pages(plain))
    q = rng.standard_normal((hq, d)).astype(np.float32)
    nr, ne = idx.n_retrieve, idx.n_estimate
    want = fw._fused_step(q, layouts["4 KiB pages"][0], sk, sv, sids, nr, ne, d ** -0.5)[0]
    got = fw._fused_step(q, layouts["huge pages"][0], sk, sv, sids, nr, ne, d ** -0.5)[0]
    assert np.array_equal(want, got), "packing changed the result"
    times = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, metas in layouts.items():
            for meta in metas:
                t0 = time.perf_counter()
                fw._fused_step(q, meta, sk, sv, sids, nr, ne, d ** -0.5)
                times[name].append(time.perf_counter() - t0)
    base = np.median(times["4 KiB pages"])
    rows = [{"metadata": name, "median_us": 1e6 * float(np.median(t)), "p90_us": 1e6 * float(np.percentile(t, 90)),
             "vs_4KiB": float(np.median(t) / base)} for name, t in times.items()]
    huge_kb = [line.split()[1] for line in open("/proc/self/smaps_rollup")
               if line.startswith("AnonHugePages")] if os.path.exists("/proc/self/smaps_rollup") else ["n/a"]
    with open(args.out, "w") as f:
        f.write(f"# Wave decode step with cold metadata: 4 KiB pages vs huge pages\n\n"
                f"Command: `python benchmarks/wave_step_cold.py {' '.join(sys.argv[1:])}`  \n"
                f"Machine: {describe()}  \n"
                f"{args.tokens} tokens, Hkv={hkv}, Hq={hq}, d={d}: {idx.n_clusters} clusters, {nr} retrieved and "
                f"{ne} estimated per step (paper budgets); {args.layers} copies stepped in turn, {args.rounds} "
                f"rounds alternating the layouts; one Numba thread. AnonHugePages of the process at the end: "
                f"{huge_kb[0]} kB.\n\n" + markdown_table(rows, ["metadata", "median_us", "p90_us", "vs_4KiB"]) + "\n")
    print(open(args.out).read())


if __name__ == "__main__":
    main()
