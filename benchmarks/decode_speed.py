"""Decode tokens/s of SmolLM2 with wave-index attention (fast backend) vs full attention, at 8K and 32K
tokens of context, in one run. Writes ``benchmarks/results/decode_speed.md``.

    python benchmarks/decode_speed.py [--steps 16] [--out benchmarks/results/decode_speed.md]

Methods: ``plain`` = the untouched model (transformers SDPA + DynamicCache), ``full`` = retrokv's fast
full attention through the same hook as the sparse methods (no KV copy in the cache), ``wave`` =
RetroInfer's wave index with the paper's budgets. The 8K context is a real prefill of built-in natural
text. SmolLM2 was trained to 8K tokens and a 32K dense prefill takes most of an hour on a 2-core CPU,
so the 32K context is the 8K prefill's KV repeated four times (positions continue past the trained
length): the tokens are not meaningful, the shapes, memory traffic and cluster counts are.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe  # noqa: E402

from retrokv.harness import eval as E  # noqa: E402


def tile(saved, reps):
    """Repeat every layer's prefill K/V ``reps`` times along the token axis (queries unused here)."""
    return {layer: (q, np.concatenate([k] * reps, axis=2), np.concatenate([v] * reps, axis=2),
                    np.concatenate([valid] * reps, axis=1)) for layer, (q, k, v, valid) in saved.items()}


def time_decode(model, method, saved, n, first, steps, warmup=2):
    with E._Method(model, method, None, "fast", saved, n) as run:
        tok = first
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            tok = int(E._forward(model, [tok], run.cache).argmax())
        secs = time.perf_counter() - t0
        dens = run.handle.mean_density() if run.handle is not None else 1.0
    return steps / secs, run.build_s, dens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192, help="real prefill length")
    ap.add_argument("--reps", default="1,4", help="contexts as multiples of the prefill")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--methods", default="plain,full,wave")
    ap.add_argument("--out", default="benchmarks/results/decode_speed.md")
    args = ap.parse_args()
    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import load_smollm2

    model, tok = load_smollm2()
    logits, saved, prefill_s = E.shared_prefill(model, natural_text_ids(tok, args.context), "fast")
    first = int(logits.argmax())
    rows = []
    for reps in (int(r) for r in args.reps.split(",")):
        ctx = tile(saved, reps) if reps > 1 else saved
        n = args.context * reps
        res = {}
        for m in args.methods.split(","):
            tps, build, dens = time_decode(model, m, ctx, n, first, args.steps)
            res[m] = tps
            rows.append({"context": n, "method": m, "decode_tok_s": tps, "ms_per_token": 1000 / tps,
                         "density": dens, "build_s": build})
            print(rows[-1], flush=True)
        for r in rows:
            if r["context"] == n and "full" in res:
                r["speedup_vs_full"] = r["decode_tok_s"] / res["full"]
                r["speedup_vs_plain"] = r["decode_tok_s"] / res.get("plain", float("nan"))
        del ctx
    cols = ["context", "method", "decode_tok_s", "ms_per_token", "speedup_vs_full", "speedup_vs_plain",
            "density", "build_s"]
    with open(args.out, "w") as f:
        f.write(f"# Decode speed on SmolLM2-135M (CPU)\n\nCommand: `python benchmarks/decode_speed.py "
                f"{' '.join(sys.argv[1:])}`  \nMachine: {describe()}  \n{args.context}-token natural-text prefill "
                f"({prefill_s:.0f} s, dense); {args.steps} timed greedy steps after 2 warm-up steps, one batch "
                f"of 1; tokens/s include the whole model (30 layers, LM head). Contexts beyond "
                f"{args.context} repeat the prefill's KV (see the script's docstring).\n\n")
        f.write(E.markdown_table(rows, cols) + "\n")
    print(E.markdown_table(rows, cols))


if __name__ == "__main__":
    main()
