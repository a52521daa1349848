"""Decode tokens/s of SmolLM2 with wave-index attention (fast backend) vs full attention, at 8K and 32K
tokens of context, in one run, with each step split into the time inside retrokv and the rest of the
model, and the index build set against the dense prefill. Writes ``benchmarks/results/decode_speed.md``.

    python benchmarks/decode_speed.py [--steps 32] [--out benchmarks/results/decode_speed.md]

Methods: ``plain`` = the untouched model (transformers SDPA + DynamicCache), ``full`` = retrokv's fast
full attention through the same hook as the sparse methods (no KV copy in the cache), ``wave`` =
RetroInfer's wave index with the paper's budgets. The 8K context is a real prefill of built-in natural
text. SmolLM2 was trained to 8K tokens and a 32K dense prefill takes most of an hour on a 2-core CPU,
so the 32K context is the 8K prefill's KV repeated four times (positions continue past the trained
length): the tokens are not meaningful, the shapes, memory traffic and cluster counts are.

**Split of a step** (issue 15 item 4): ``retrokv_ms`` is :attr:`retrokv.hf.Attached.decode_seconds` per
step: every layer's hand-over of the new q/k/v, ``append`` and ``attend`` (statistics included);
``model_ms`` is the rest of the step (projections, MLPs, norms, RoPE, LM head, transformers' glue).
Each is the median over the timed steps of that step's own value (``--steps``, default 32).

**Build against prefill** (item 5): at 8K the dense prefill is the real one of this run. A 32K
prefill is not run (see above); its stand-in is a lower bound: one layer's causal attention over the
tiled 32K Q/K/V with torch's SDPA (the kernel of the real prefill), measured, times the 30 layers (the
projections and MLPs of a real prefill come on top). The same stand-in is measured at 8K, next to the
real prefill, so the two can be compared.
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
    """Per-step medians over ``steps`` timed greedy steps: a step preempted by another process on a shared
    2-core machine moves a mean by milliseconds, a median not (each step's split is its own)."""
    with E._Method(model, method, None, "fast", saved, n) as run:
        tok, wall, inside = first, [], []
        for i in range(warmup + steps):
            if i == warmup and run.handle is not None:
                run.handle.reset_stats()            # statistics of the timed steps only
            before = run.handle.decode_seconds if run.handle is not None else 0.0
            t0 = time.perf_counter()
            tok = int(E._forward(model, [tok], run.cache).argmax())
            if i >= warmup:
                wall.append(time.perf_counter() - t0)
                inside.append(run.handle.decode_seconds - before if run.handle is not None else float("nan"))
        dens = run.handle.mean_density() if run.handle is not None else 1.0
    wall, inside = np.array(wall), np.array(inside)
    step = float(np.median(wall))
    return {"decode_tok_s": 1.0 / step, "ms_per_token": 1000 * step, "retrokv_ms": 1000 * float(np.median(inside)),
            "model_ms": 1000 * float(np.median(wall - np.nan_to_num(inside))),
            "retrokv_share_%": 100 * float(np.median(inside / wall)), "density": dens, "build_s": run.build_s}


def attention_prefill_s(saved, reps, layer=15):
    """Seconds of one layer's causal prefill attention at ``reps`` x the prefill, x layers: torch's SDPA,
    the kernel the real prefill runs (``hf`` prefills densely with transformers' SDPA)."""
    import torch
    import torch.nn.functional as F

    q, k, v, _ = saved[layer]
    q = torch.from_numpy(np.concatenate([q] * reps, axis=2))                 # (1, Hq, N, d)
    k, v = (torch.from_numpy(np.concatenate([x] * reps, axis=2)) for x in (k, v))
    t0 = time.perf_counter()
    with torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return (time.perf_counter() - t0) * len(saved)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192, help="real prefill length")
    ap.add_argument("--reps", default="1,4", help="contexts as multiples of the prefill")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--methods", default="plain,full,wave")
    ap.add_argument("--out", default="benchmarks/results/decode_speed.md")
    args = ap.parse_args()
    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import load_smollm2

    load0 = "%.1f / %.1f / %.1f" % os.getloadavg()
    model, tok = load_smollm2()
    logits, saved, prefill_s = E.shared_prefill(model, natural_text_ids(tok, args.context), "fast")
    first = int(logits.argmax())
    rows, pre = [], []
    for reps in (int(r) for r in args.reps.split(",")):
        ctx = tile(saved, reps) if reps > 1 else saved
        n = args.context * reps
        attn_s = attention_prefill_s(saved, reps)
        ref_s = prefill_s if reps == 1 else attn_s
        pre.append({"context": n, "dense_prefill_s": prefill_s if reps == 1 else float("nan"),
                    "attention_only_prefill_s": attn_s})
        res = {}
        for m in args.methods.split(","):
            r = {"context": n, "method": m, **time_decode(model, m, ctx, n, first, args.steps)}
            r["build_vs_prefill"] = r["build_s"] / ref_s
            res[m] = r["decode_tok_s"]
            rows.append(r)
            print(rows[-1], flush=True)
        for r in rows:
            if r["context"] == n and "full" in res:
                r["speedup_vs_full"] = r["decode_tok_s"] / res["full"]
                r["speedup_vs_plain"] = r["decode_tok_s"] / res.get("plain", float("nan"))
        del ctx
    load1 = "%.1f / %.1f / %.1f" % os.getloadavg()
    cols = ["context", "method", "decode_tok_s", "ms_per_token", "retrokv_ms", "model_ms", "retrokv_share_%",
            "speedup_vs_full", "speedup_vs_plain", "density", "build_s", "build_vs_prefill"]
    with open(args.out, "w") as f:
        f.write(f"# Decode speed on SmolLM2-135M (CPU)\n\nCommand: `python benchmarks/decode_speed.py "
                f"{' '.join(sys.argv[1:])}`  \nMachine: {describe()}  \nLoad average {load0} at start, {load1} "
                f"at the end (1/5/15 min).  \n{args.context}-token natural-text prefill "
                f"({prefill_s:.0f} s, dense); {args.steps} timed greedy steps after 2 warm-up steps, one batch "
                f"of 1; every column is a median over the timed steps (the share: the median of each step's own "
                f"share); tokens/s include the whole model (30 layers, LM head). Contexts beyond "
                f"{args.context} repeat the prefill's KV (see the script's docstring).\n\n"
                f"`retrokv_ms`: time inside retrokv per step (every layer's q/k/v hand-over, `append`, `attend`, "
                f"statistics: `Attached.decode_seconds`); `model_ms`: the rest of the step. `build_vs_prefill`: "
                f"the 30-layer index build over the dense prefill of the same run at {args.context} tokens, and "
                f"over the attention-only lower bound of a prefill beyond it (table below).\n\n")
        f.write(E.markdown_table(rows, cols) + "\n\nPrefill reference (seconds, 30 layers; attention-only = "
                "one layer's causal attention with torch's SDPA, measured, x 30; a lower bound on a "
                "real prefill):\n\n" + E.markdown_table(pre, ["context", "dense_prefill_s", "attention_only_prefill_s"])
                + "\n")
    print(open(args.out).read())


if __name__ == "__main__":
    main()
