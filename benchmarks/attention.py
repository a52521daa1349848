"""Decode full attention on the CPU: reference vs fast vs torch SDPA vs the memory-bandwidth bound.

    python benchmarks/attention.py [--sizes 8192 32768 131072] [--repeats 5]

One decode step with Llama-3-8B shapes (Hkv=8, G=4, d=128, float32 K/V). Decode attention reads every
key and value once, so the floor is the time to stream K and V from memory: measured in the same
run by a parallel Numba pass that sums K and V (no arithmetic to speak of). Prints a markdown table
and writes it to benchmarks/results/attention.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import numba as nb
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from machine import best_of, describe  # noqa: E402

import retrokv.fast as fast  # noqa: E402
import retrokv.reference as ref  # noqa: E402


@nb.njit(parallel=True, cache=True, fastmath=True)
def _stream(k, v):
    """Read K and V once (sum per head): the bandwidth floor for decode attention."""
    hkv, n, d = k.shape
    rows = hkv * n
    kf, vf = k.reshape(rows, d), v.reshape(rows, d)
    part = np.zeros(rows, dtype=np.float32)
    for r in nb.prange(rows):
        s = np.float32(0.0)
        for x in range(d):
            s += kf[r, x] + vf[r, x]
        part[r] = s
    return part.sum()



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.md"))
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    hkv, g, d = 8, 4, 128
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        q = rng.standard_normal((hkv * g, d)).astype(np.float32)
        k = rng.standard_normal((hkv, n, d)).astype(np.float32)
        v = rng.standard_normal((hkv, n, d)).astype(np.float32)
        tq, tk, tv = torch.from_numpy(q)[None, :, None], torch.from_numpy(k)[None], torch.from_numpy(v)[None]
        ref_out, fast_out = ref.full_attention(q, k, v), fast.full_attention(q, k, v)
        with torch.no_grad():
            sdpa_out = F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)[0, :, 0].numpy()
        err = max(np.abs(fast_out - ref_out).max(), np.abs(sdpa_out - ref_out).max())
        t_bound = best_of(lambda: _stream(k, v), args.repeats)
        t_ref = best_of(lambda: ref.full_attention(q, k, v), args.repeats)
        t_fast = best_of(lambda: fast.full_attention(q, k, v), args.repeats)
        with torch.no_grad():
            t_sdpa = best_of(lambda: F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True), args.repeats)
        gb = 2 * k.nbytes / 1e9
        rows.append((n, gb, t_bound, t_fast, t_ref, t_sdpa, err))
        print(f"N={n}: bound {t_bound*1e3:.1f} ms, fast {t_fast*1e3:.1f} ms, ref {t_ref*1e3:.1f} ms, sdpa {t_sdpa*1e3:.1f} ms",
              file=sys.stderr)

    lines = [
        "Decode full attention, one step, Hkv=8, G=4, d=128, float32 K/V (best of "
        f"{args.repeats}); machine: {describe()}.",
        "",
        "| N | K+V (GB) | bandwidth bound (ms) | fast (ms) | fast / bound | reference (ms) | torch SDPA (ms) "
        "| SDPA / fast | reference / fast | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, gb, tb, tf, tr, ts, err in rows:
        lines.append(f"| {n:,} | {gb:.2f} | {tb*1e3:.1f} | {tf*1e3:.1f} | {tf/tb:.2f}x | {tr*1e3:.1f} | {ts*1e3:.1f} "
                     f"| {ts/tf:.1f}x | {tr/tf:.1f}x | {err:.1e} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table + "\n\nCommand: `python benchmarks/attention.py`\n")


if __name__ == "__main__":
    main()
