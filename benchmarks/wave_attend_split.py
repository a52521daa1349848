"""Where a wave-index decode step goes at 128K tokens (issue 15 item 3, report only), against the machine's
streaming bandwidth measured in the same run. Writes ``benchmarks/results/wave_attend_split.md``.

    python benchmarks/wave_attend_split.py [--n 131072] [--repeats 20]

Same synthetic keys and shapes as the speed part of ``benchmarks/wave_index.py`` (Hkv=8, G=4, d=128,
float32, RetroInfer defaults). The fast ``attend`` is the reference driver ``tripartite_attention`` with
the fast kernels; here the driver runs with a timing wrapper around each kernel (``ops=``), so the split
is of the calls ``WaveIndex.attend`` makes on its composed path (with more KV heads than threads it runs
the same per-head kernels fused, one kernel per step, bit-equal): centroid scoring, GQA ranking (softmax + sum), zone
selection, exact attention over the steady zone and the retrieved clusters where they lie (one kernel
for every KV head, no execution-buffer copy), estimation, merge.
Bandwidth: a parallel, vectorised Numba sum over a 1 GiB float32 array (read-only streaming, all
threads), best of 5. Byte
bound = the step's ``bytes_read`` / that bandwidth.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types


import numba as nb  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from machine import best_of, describe  # noqa: E402
from wave_index import synthetic_kv  # noqa: E402

import retrokv.fast as fast  # noqa: E402
import retrokv.fast.wave_index as fw  # noqa: E402
from retrokv.harness import eval as E  # noqa: E402
from retrokv.wave_index import WaveIndex  # noqa: E402


@nb.njit(parallel=True, cache=True, fastmath=True)
def _stream_sum(x):
    s = np.float32(0.0)                 # fastmath: the reduction vectorises, so memory is the limit
    for i in nb.prange(x.shape[0]):
        s += x[i]
    return s


def bandwidth(gib=1.0, repeats=5):
    x = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    t = best_of(lambda: _stream_sum(x), repeats)
    return x.nbytes / t


def timing_ops(times):
    """``fast.wave_index`` with every kernel the driver calls timed into ``times[name]`` (seconds, summed)."""
    def timed(name, f):
        def g(*a, **kw):
            t = time.perf_counter()
            r = f(*a, **kw)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
            return r
        return g

    def rank_clusters(q, centroids, sizes, scale, group_rank="softmax_sum", radii=None, radius_weight=0.0, n_plain=0):
        assert not radius_weight, "the split times the centroid-score ranking"   # fast.wave_index's, in two
        hkv, c, d = centroids.shape
        qb = np.ascontiguousarray(q.reshape(hkv, -1, d), dtype=np.float32)
        scores = timed("centroid scoring", fw._centroid_scores)(qb, centroids, sizes, np.float32(scale))
        return scores, timed("ranking (softmax, GQA sum)", fw._gqa_rank)(scores, group_rank == "max_logit")

    ops = types.SimpleNamespace(
        rank_clusters=rank_clusters,
        select_zones=timed("zone selection", fw.select_zones),
        attend_retrieved=timed("exact attention (steady + retrieved, read in place)", fw.attend_retrieved),
        estimate_partial=timed("estimation", fw.estimate_partial),
        merge_partials=timed("merge", fw.merge_partials),
    )
    return ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/wave_attend_split.md")
    args = ap.parse_args()
    load0 = "%.1f / %.1f / %.1f" % os.getloadavg()
    n, hkv, g, d = args.n, 8, 4, 128
    k, v, qs, _ = synthetic_kv(n, args.repeats, hkv, g, d)   # the keys of benchmarks/wave_index.py
    print("building", flush=True)
    idx = WaveIndex.build(k, v, backend="fast")
    it = iter(qs * 100)
    attend = best_of(lambda: idx.attend(next(it)), args.repeats)
    fused, fw._fused = fw._fused, lambda work, hkv: False              # the composed path, side by side
    composed = best_of(lambda: idx.attend(next(it)), args.repeats)
    fw._fused = fused
    attend = min(attend, best_of(lambda: idx.attend(next(it)), args.repeats))   # again, after the composed runs
    full = best_of(lambda: fast.full_attention(qs[0], k, v), 5)
    nbytes = idx.last_stats.bytes_read
    bw = bandwidth()

    times, per_step = {}, []
    ops = timing_ops(times)
    call = lambda q: fw.tripartite_attention(q, idx._meta, idx._sk, idx._sv, idx._sids, idx.n_retrieve,  # noqa: E731
                                             idx.n_estimate, idx.config.scale, None, idx._workspace, ops=ops)
    call(qs[0])
    want = idx.attend(qs[0])
    assert np.array_equal(call(qs[0])[0], want), "the timed driver must compute what attend computes"
    split = []                                                # per step: {part: seconds}
    for q in qs[1:]:
        times.clear()
        t = time.perf_counter()
        call(q)
        per_step.append(time.perf_counter() - t)
        split.append(dict(times))
    steps = len(qs) - 1
    total = float(np.median(per_step))
    # medians over the steps (a shared machine adds outliers), so the parts need not sum to the total
    parts = {name: float(np.median([x[name] for x in split])) for name in split[0]}
    load1 = "%.1f / %.1f / %.1f" % os.getloadavg()
    rows = [{"part": name, "ms_per_step": 1e3 * s, "share_%": 100 * s / total} for name, s in parts.items()]
    rest = float(np.median([p - sum(x.values()) for p, x in zip(per_step, split)]))
    rows.append({"part": "driver (Python: slicing, concatenation, stats)", "ms_per_step": 1e3 * rest,
                 "share_%": 100 * rest / total})
    bound = nbytes / bw
    rows2 = [{"what": "attend (best of 2 x %d, before and after the composed runs)" % args.repeats, "ms": 1e3 * attend},
             {"what": "attend, composed path (best of %d)" % args.repeats, "ms": 1e3 * composed},
             {"what": "composed path, timed driver (median)", "ms": 1e3 * total},
             {"what": "fast full attention (best of 5)", "ms": 1e3 * full},
             {"what": "byte bound: %.1f MiB read / %.1f GB/s streaming" % (nbytes / 2**20, bw / 1e9), "ms": 1e3 * bound}]
    with open(args.out, "w") as f:
        f.write(f"# Wave attend at {n} tokens: time split and byte bound (CPU)\n\nCommand: `python "
                f"benchmarks/wave_attend_split.py {' '.join(sys.argv[1:])}`  \nMachine: {describe()}  \n"
                f"Contention: shared machine, load average {load0} at start, {load1} at the end (1/5/15 min).  \n"
                f"Hkv=8, G=4, d=128, float32, RetroInfer defaults; density {idx.last_stats.density:.4f}.\n\n"
                + E.markdown_table(rows2, ["what", "ms"]) +
                f"\n\nattend / byte bound = **{attend / bound:.1f}x**; full attention / attend = "
                f"**{full / attend:.1f}x**.\n\nSplit of one step of the composed path, the kernels called one by one "
                f"(`attend` runs them as one kernel per KV head when there are more KV heads than threads, "
                f"`fast.wave_index._fused`; same bits; median of {steps} steps per part; share of the median step):\n\n"
                + E.markdown_table(rows, ["part", "ms_per_step", "share_%"]) + "\n")
    print(open(args.out).read())


if __name__ == "__main__":
    main()
