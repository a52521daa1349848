"""RetroInfer wave buffer on a real SmolLM2 decode: hit ratio, bytes moved, bookkeeping time, in one run.

    python benchmarks/wave_buffer.py [--tokens 4096] [--generate 256] [--layers all]

Method. SmolLM2-135M greedily generates ``--generate`` tokens (plain transformers) after a
``--tokens``-token natural-text prompt. One ``capture_qkv`` forward over prompt + generation then
gives the post-RoPE q/k/v of every position, which are exactly the inputs that decoding with a wave
index would see. Per layer, a :class:`WaveIndex` (RetroInfer defaults) is built on the prompt's
keys and the generated positions are replayed one by one: ``append(k_t, v_t)``, then ``attend(q_t)``
with and without the wave buffer. Buffers at cache fractions 2%, 5%, 10% (and 100%: only
compulsory misses, an upper bound for any policy) see the same retrieval sequence; a reference-backend
buffer at 5% replays it too, for the bookkeeping time fast vs reference and to check both decide the same.
Caches start empty (cold), as after a prefill.

Writes ``benchmarks/results/wave_buffer.md`` and ``docs/img/wave_buffer_hits.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


import numpy as np
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import describe  # noqa: E402

from retrokv.wave_index import WaveConfig, WaveIndex  # noqa: E402
from retrokv.wave_buffer import WaveBuffer  # noqa: E402

FRACTIONS = (0.02, 0.05, 0.10, 1.0)
WARMUP = 32      # steps excluded from the "warm" hit ratio


def generate(model, tok, prompt, n_new, no_repeat_ngram=0):
    """Greedy decoding; ``no_repeat_ngram > 0`` bans repeated n-grams (transformers' ``no_repeat_ngram_size``),
    which keeps a small model from looping."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=tok.eos_token_id, no_repeat_ngram_size=no_repeat_ngram)
    return out[0, len(prompt):].tolist()


def replay(cap, start, buf_fractions):
    """Replay positions start.. of one layer; per fraction the per-step (hits, retrieved, bytes, no-cache bytes)."""
    hkv, n, d = cap.k.shape
    idx = WaveIndex.build(cap.k[:, :start], cap.v[:, :start], config=WaveConfig(), backend="fast")
    bufs = {f: WaveBuffer(idx, f, backend="fast") for f in buf_fractions}
    ref = WaveBuffer(idx, 0.05, backend="reference")
    main = bufs[0.05]
    max_diff, overlap, prev, same = 0.0, [], None, True
    for t in range(start, n):
        idx.append(cap.k[:, t], cap.v[:, t])
        q = cap.q[:, t]
        plain = idx.attend(q)
        out = idx.attend(q, buffer=main)
        max_diff = max(max_diff, float(np.abs(out - plain).max()))
        r = idx.last_stats.retrieval_clusters
        for f, b in bufs.items():
            if b is not main:
                b.gather(r)
        ref.gather(r)
        s, o = main.stats, ref.stats
        same &= (s.hits, s.admitted, s.evicted, s.cache_blocks_used) == (o.hits, o.admitted, o.evicted,
                                                                         o.cache_blocks_used)
        if prev is not None:        # share of this step's clusters retrieved by the previous step
            overlap.append(np.mean([len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(r.tolist(), prev)]))
        prev = r.tolist()
    hist = {f: np.array([(x.hits, x.retrieved, x.bytes_h2d, x.bytes_no_cache, x.occupancy) for x in b.history])
            for f, b in bufs.items()}
    timing = {name: np.array([(x.seconds_control, x.seconds_copy) for x in b.history])
              for name, b in (("fast", main), ("reference", ref))}
    info = dict(clusters=idx.n_clusters, retrieve=idx.n_retrieve, cap=main.capacity_blocks,
                host_blocks=main.host_blocks, max_diff=max_diff, same=same, overlap=float(np.mean(overlap)))
    return hist, timing, info


def plot(per_step, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for f, ys in per_step.items():
        ax.plot(np.arange(1, len(ys) + 1), ys, lw=1.2, label=f"cache {f:.0%}" if f < 1 else "cache 100% (bound)")
    ax.axhline(0.75, color="k", ls=":", lw=1, label="target 0.75 at 5%")
    ax.set_xlabel("decode step")
    ax.set_ylabel("hit ratio (all layers and KV heads)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Wave buffer hit ratio over a SmolLM2 decode")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--generate", type=int, default=256)
    ap.add_argument("--layers", default="all", help="'all' or comma-separated layer indices")
    ap.add_argument("--no-repeat-ngram", type=int, default=0, help="ban repeated n-grams of this size (0: plain greedy)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "wave_buffer.md"))
    ap.add_argument("--plot", default=os.path.join(HERE, "..", "docs", "img", "wave_buffer_hits.png"))
    args = ap.parse_args(argv)

    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import capture_qkv, load_smollm2

    model, tok = load_smollm2()
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    prompt = natural_text_ids(tok, args.tokens)
    t0 = time.perf_counter()
    gen = generate(model, tok, prompt, args.generate, args.no_repeat_ngram)
    t_gen = time.perf_counter() - t0
    distinct = len(set(gen)) / len(gen)
    sample = tok.decode(gen[:48]).replace("\n", " ").replace("|", "/").replace("`", "'")
    print(f"generated {len(gen)} tokens in {t_gen:.0f} s; distinct {distinct:.2f}: {sample!r}", flush=True)

    hits = {f: [] for f in FRACTIONS}                 # per layer: (steps, 5) arrays
    timing, infos = {"fast": [], "reference": []}, []
    for group in [layers[i:i + 10] for i in range(0, len(layers), 10)]:   # bounded memory: 10 layers a capture
        cap = capture_qkv(model, prompt + gen, layers=group)
        for layer in tqdm(group, desc=f"layers {group[0]}-{group[-1]}"):
            hist, tm, info = replay(cap[layer], args.tokens, FRACTIONS)
            for f in FRACTIONS:
                hits[f].append(hist[f])
            for k in timing:
                timing[k].append(tm[k])
            infos.append((layer, info))
        del cap

    tot = {f: np.sum(hits[f], axis=0) for f in FRACTIONS}       # (steps, 5) summed over layers
    per_step = {f: tot[f][:, 0] / tot[f][:, 1] for f in FRACTIONS}
    n_steps = len(per_step[0.05])
    lines = [f"Machine: {describe()}; load average at the end {os.getloadavg()[0]:.1f}.", "",
             f"SmolLM2-135M, {args.tokens}-token natural-text prompt, {n_steps} generated tokens replayed "
             f"({'greedy' if not args.no_repeat_ngram else f'greedy with no_repeat_ngram_size={args.no_repeat_ngram}'}; "
             f"distinct-token share {distinct:.2f}; it begins: \"{sample[:120]}...\"), "
             f"{len(layers)} layers x 3 KV heads, RetroInfer defaults "
             f"({infos[0][1]['clusters']} clusters per head at the start, {infos[0][1]['retrieve']} retrieved per "
             f"step), block size 8, cold caches. Hit ratios count clusters over all layers and heads; "
             "bytes are keys + values (float32) per decode step, summed over all layers and heads.", "",
             "| cache fraction | cache blocks per head | hit ratio, all steps | hit ratio, steps > "
             f"{WARMUP} | min per-step (steps > {WARMUP}) | MiB host->device per step | MiB per step, no cache "
             "| bytes saved | mean occupancy |",
             "|---|---|---|---|---|---|---|---|---|"]
    caps = {f: int(np.ceil(f * infos[0][1]["host_blocks"] - 1e-9)) for f in FRACTIONS}
    for f in FRACTIONS:
        t = tot[f]
        warm = t[WARMUP:]
        name = f"{f:.0%}" if f < 1 else "100% (compulsory misses only)"
        lines.append(f"| {name} | {caps[f]} (layer {infos[0][0]}) | {t[:, 0].sum() / t[:, 1].sum():.3f} | "
                     f"**{warm[:, 0].sum() / warm[:, 1].sum():.3f}** | {per_step[f][WARMUP:].min():.3f} | "
                     f"{t[:, 2].mean() / 2**20:.3f} | {t[:, 3].mean() / 2**20:.3f} | "
                     f"{1 - t[:, 2].sum() / t[:, 3].sum():.1%} | {t[:, 4].mean() / len(layers):.2f} |")
    by_layer = np.array([h[:, 0].sum() / h[:, 1].sum() for h in hits[0.05]])
    overlap = np.mean([i["overlap"] for _, i in infos])
    tf, tr = (np.concatenate(timing[k]) for k in ("fast", "reference"))
    lines += ["", f"- per-layer hit ratio at 5%: min {by_layer.min():.3f} (layer {layers[int(by_layer.argmin())]}), "
              f"median {np.median(by_layer):.3f}, max {by_layer.max():.3f}",
              f"- mean share of a step's retrieved clusters that the previous step also retrieved: {overlap:.3f}",
              f"- attend with the buffer vs without: max abs difference {max(i['max_diff'] for _, i in infos):.1e} "
              f"over all layers and steps; fast and reference buffers made the same decisions: "
              f"{all(i['same'] for _, i in infos)}", "",
              "Bookkeeping time per layer-step (one `gather`, 3 KV heads), medians over all layers and steps:", "",
              "| backend | control plane: lookup, admission, eviction, LRU (us) | data: fill + scatter (us) |",
              "|---|---|---|",
              f"| fast (Numba) | {np.median(tf[:, 0]) * 1e6:.1f} | {np.median(tf[:, 1]) * 1e6:.1f} |",
              f"| reference (NumPy/Python) | {np.median(tr[:, 0]) * 1e6:.1f} | {np.median(tr[:, 1]) * 1e6:.1f} |",
              f"| reference / fast | {np.median(tr[:, 0]) / np.median(tf[:, 0]):.1f}x | "
              f"{np.median(tr[:, 1]) / np.median(tf[:, 1]):.1f}x |"]
    cmd = "python benchmarks/wave_buffer.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join(lines + ["", f"Command: `{cmd.strip()}`", ""])
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    plot(per_step, args.plot)


if __name__ == "__main__":
    main()
