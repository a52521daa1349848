"""Attention sparsity report: SmolLM2 on a built-in natural-text prompt; attention sparsity and the query/key gap per layer.

    python -m retrokv.harness.sparsity [--tokens 4096] [--decode 64]

Loads the embedded SmolLM2-135M-Instruct offline, captures every layer's Q/K/V on a few thousand
tokens of natural text, and prints one markdown table: per layer, the share of keys holding 90% of
the attention mass of the last ``--decode`` positions, the Mahalanobis distance of queries vs held-out
keys to the key distribution, and the recall@100 of a plain IVF index probed with queries vs keys.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from tqdm import tqdm

from .analysis import ivf_recall_curves, mass_fraction, ood_distances


def sparsity_ood_table(qkv, n_decode=64, fractions=(0.05, 0.2), top_k=100):
    """Markdown rows for each captured layer (see module docstring)."""
    rows = []
    for layer, c in tqdm(sorted(qkv.items()), desc="layers", leave=False):
        t = c.q.shape[1]
        split = t - n_decode
        frac = mass_fraction(c.q, c.k, np.arange(split, t))
        dist = ood_distances(c.q, c.k, split)
        g = c.q.shape[0] // c.k.shape[0]
        rec_q, rec_k = [], []
        for h in range(c.k.shape[0]):
            db = c.k[h, :split]
            by_q, by_k = ivf_recall_curves(db, [c.q[h * g, split:], c.k[h, split:]], fractions, k=top_k)
            rec_q.append(by_q)
            rec_k.append(by_k)
        rq, rk_ = np.mean(rec_q, 0), np.mean(rec_k, 0)
        rows.append(f"| {layer} | {100 * np.median(frac):.1f}% | {np.median(dist[:, 1] / dist[:, 0]):.1f}x | "
                    + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(rq, rk_)) + " |")
    head = ("| layer | keys holding 90% of mass (median) | Mahalanobis distance, queries / held-out keys | "
            + " | ".join(f"IVF recall@{top_k} at {100 * f:.0f}% scanned: queries / keys" for f in fractions) + " |")
    sep = "|" + "---|" * (3 + len(fractions))
    return "\n".join([head, sep, *rows])


def add_arguments(ap):
    """The report's options (shared by ``python -m retrokv.harness.sparsity`` and ``retrokv sparsity``)."""
    ap.add_argument("--tokens", type=int, default=4096, help="prompt length (built-in natural text)")
    ap.add_argument("--decode", type=int, default=64, help="last positions used as decode queries")


def check_args(args):
    """Refuse bad options before the model loads."""
    from .cli import MAX_CONTEXT, CLIError

    if not 256 <= args.tokens <= MAX_CONTEXT:
        raise CLIError(f"--tokens must be in [256, {MAX_CONTEXT}], got {args.tokens}")
    if not 1 <= args.decode < args.tokens // 2:
        raise CLIError(f"--decode must be >= 1 and less than half of --tokens ({args.tokens}), got {args.decode}")


def run(args):
    from .data import natural_text_ids
    from .models import capture_qkv, load_smollm2

    t0 = time.time()
    print("loading SmolLM2-135M-Instruct (embedded GGUF, offline) ...")
    model, tok = load_smollm2()
    ids = natural_text_ids(tok, args.tokens)
    print(f"capturing Q/K/V of all layers on {args.tokens} tokens of built-in natural text ...")
    qkv = capture_qkv(model, ids)
    print()
    print(f"SmolLM2-135M, {args.tokens}-token prompt, decode queries = last {args.decode} positions")
    print()
    print(sparsity_ood_table(qkv, n_decode=args.decode))
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


def main(argv=None):
    from .cli import main as cli_main

    return cli_main(["sparsity", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
