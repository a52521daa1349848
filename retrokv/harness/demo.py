"""``make demo``: SmolLM2 answers passkey prompts with full, StreamingLLM, wave-index and graph attention.

    python -m retrokv.harness.demo [--lengths 4096,8192] [--samples 2] [--backend fast] [--ppl-tokens 64]

One table, per prompt length and method: passkey accuracy, perplexity change on natural text (the
method active for every predicted token, relative to full attention), density (fraction of the
context read exactly per decode step) and decode tokens/s. Every method decodes from the same dense
prefill (:func:`retrokv.harness.eval.shared_prefill`), so the prefill is paid once per prompt. StreamingLLM
gets the wave index's exact budget (4 sinks + 64 recent + 1.8% of the tokens); every other method runs
with its defaults (:func:`retrokv.harness.eval.method_config`): the graph index builds from all prefill
queries, as the paper does. Each stage (prefill, index build per method with a bar over the layers,
decode) shows a progress bar. The committed, larger run (20 prompts per length) is
``benchmarks/passkey.py``.
"""
from __future__ import annotations

import argparse
import sys
import time

from . import eval as E

DEMO_METHODS = ("full", "streaming", "wave", "graph")


def passkey_table(model, tok, lengths, samples, methods=DEMO_METHODS, backend="fast", ppl_tokens=64,
                  progress=True, configs=None):
    """Rows ``{length, method, accuracy, ppl, ppl_delta_%, density, decode_tok_s, build_s}``, plus
    ``answers`` (the generated texts) and ``depths``/``expected`` (per prompt) for per-depth reports."""
    from .data import natural_text_ids

    configs = {} if configs is None else configs
    rows = []
    for n in lengths:
        prompts = E.make_samples(tok, "passkey", [n], samples)
        res = E.run_task(model, tok, prompts, methods, configs, backend=backend, progress=progress)
        ppl = {}
        if ppl_tokens:
            ppl = E.perplexity(model, natural_text_ids(tok, n + ppl_tokens), n, methods, configs,
                               backend=backend, progress=progress)
        base = ppl["full"][0] if "full" in ppl else None
        for r in res:
            row = {"length": n, **r, "depths": [p.depth for p in prompts], "expected": [p.answer for p in prompts]}
            if r["method"] in ppl:
                row["ppl"] = ppl[r["method"]][0]
                if base:
                    row["ppl_delta_%"] = 100 * (row["ppl"] / base - 1)
            rows.append(row)
    return rows


COLUMNS = ["length", "method", "samples", "accuracy", "ppl", "ppl_delta_%", "density", "decode_tok_s", "build_s"]


def _lengths(s):
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 256:
        raise argparse.ArgumentTypeError(f"lengths must be a comma list of ints >= 256, got {s!r}")
    return vals


def add_arguments(ap):
    """The demo's options (shared by ``python -m retrokv.harness.demo`` and ``retrokv demo``)."""
    ap.add_argument("--lengths", type=_lengths, default=[4096, 8192])
    ap.add_argument("--samples", type=int, default=2, help="passkey prompts per length (depths evenly spaced)")
    ap.add_argument("--backend", choices=("reference", "fast"), default="fast")
    ap.add_argument("--ppl-tokens", type=int, default=64, help="predicted tokens for the perplexity column (0: skip)")


def check_args(args):
    """Refuse bad options before the model loads."""
    from .cli import CLIError, check_context

    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.ppl_tokens < 0:
        raise CLIError(f"--ppl-tokens must be >= 0, got {args.ppl_tokens}")
    check_context(max(args.lengths), args.ppl_tokens)


def run(args):
    from .models import load_smollm2

    t0 = time.time()
    model, tok = load_smollm2()
    rows = passkey_table(model, tok, args.lengths, args.samples, backend=args.backend, ppl_tokens=args.ppl_tokens)
    print(f"\nSmolLM2-135M passkey, {args.samples} prompts per length, backend={args.backend} "
          f"({time.time() - t0:.0f} s):\n")
    print(E.markdown_table(rows, COLUMNS))
    return 0


def main(argv=None):
    from .cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
