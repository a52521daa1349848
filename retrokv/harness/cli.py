"""The ``retrokv`` command: ``retrokv demo``, ``retrokv eval`` and ``retrokv sparsity`` on the embedded SmolLM2;
``retrokv warmup`` compiles the fast kernels into Numba's cache (``make setup`` runs it).

Example (writes ``results/eval.md`` and ``results/eval_*.png``)::

    retrokv eval --tasks passkey --methods full,streaming,wave,graph --lengths 4096,8192 --samples 20 \
        --backend fast --ppl --layer-errors --out results

Every argument is checked before the model loads, and every error is one line on stderr (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .. import methods as _methods

METHODS = ("plain",) + _methods.names()
MAX_CONTEXT = 8192      # SmolLM2-135M's trained context (max_position_embeddings)


class CLIError(Exception):
    """A bad argument found before any work: printed as one line."""


def _csv(kind, allowed=None):
    def parse(s):
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        if kind == "depths":
            try:
                vals = [float(x) for x in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"depths must be numbers, got {s!r}") from None
            if not all(0 <= x <= 1 for x in vals):
                raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {s!r}")
            return vals
        if kind == "lengths":
            try:
                vals = [int(x) for x in items]
            except ValueError:
                raise argparse.ArgumentTypeError(f"lengths must be integers, got {s!r}") from None
            if min(vals) < 256:
                raise argparse.ArgumentTypeError(f"lengths must be >= 256 tokens, got {s!r}")
            return vals
        bad = [x for x in items if allowed and x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {kind} {bad}; choose from {', '.join(allowed)}")
        return items
    return parse


def build_parser():
    from . import demo, sparsity
    from .eval import TASKS

    p = argparse.ArgumentParser(prog="retrokv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="passkey prompts answered with full, StreamingLLM, wave and graph attention")
    demo.add_arguments(d)
    w = sub.add_parser("warmup", help="compile the fast backend's Numba kernels into the on-disk cache")
    w.add_argument("--methods", type=_csv("methods", _methods.names()), default=None,
                   help=f"comma list of {', '.join(_methods.names())} (default: all)")
    s = sub.add_parser("sparsity", help="how sparse SmolLM2's attention is, and how far queries sit from keys")
    sparsity.add_arguments(s)
    e = sub.add_parser("eval", help="synthetic retrieval tasks, perplexity and per-layer error on SmolLM2")
    e.add_argument("--tasks", type=_csv("tasks", TASKS), default=["passkey"], help=f"comma list of {TASKS}")
    e.add_argument("--methods", type=_csv("methods", METHODS), default=["full", "streaming", "wave", "graph"],
                   help="comma list; 'plain' is the untouched model (transformers SDPA)")
    e.add_argument("--lengths", type=_csv("lengths"), default=[4096], help="prompt lengths in tokens")
    e.add_argument("--samples", type=int, default=5,
                   help="prompts per task and length (depths evenly spaced), or per depth with --depths")
    e.add_argument("--depths", type=_csv("depths"), default=None, help="needle depths in [0, 1], e.g. 0.1,0.5,0.9")
    e.add_argument("--backend", choices=("reference", "fast"), default="fast")
    e.add_argument("--ppl", action="store_true", help="perplexity of natural text, method active per token")
    e.add_argument("--ppl-tokens", type=int, default=128, help="predicted tokens for --ppl")
    e.add_argument("--layer-errors", action="store_true", help="per-layer attention error/density/recall")
    e.add_argument("--frontier", action="store_true",
                   help="instead of the tasks: the attention-error frontier (error vs byte density, every method's "
                        "budget swept) on captured Q/K/V of both built-in corpora at the first --lengths value "
                        "(2048-4096 recommended); writes frontier.md, frontier.json and frontier.png to --out")
    e.add_argument("--frontier-layers", default="5,15,25", help="comma list of layers for --frontier")
    e.add_argument("--out", default="results", help="output folder for eval.md, eval.json and plots")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_eval_args(args):
    """Everything ``retrokv eval`` can refuse without the model, so that no error comes after minutes of work."""
    if args.samples < 1:
        raise CLIError(f"--samples must be >= 1, got {args.samples}")
    if args.ppl and args.ppl_tokens < 1:
        raise CLIError(f"--ppl-tokens must be >= 1, got {args.ppl_tokens}")
    check_context(max(args.lengths), args.ppl_tokens if args.ppl else 0)
    check_out_dir(args.out)


def check_context(length, ppl_tokens):
    """A prompt longer than SmolLM2's trained context is refused; perplexity tokens predicted past it
    (the committed 8K runs predict 64 tokens after an 8192-token context) are allowed, with a note."""
    if length > MAX_CONTEXT:
        raise CLIError(f"--lengths {length} exceeds SmolLM2's {MAX_CONTEXT}-token context")
    if length + ppl_tokens > MAX_CONTEXT:
        print(f"note: the last {length + ppl_tokens - MAX_CONTEXT} perplexity tokens are predicted past SmolLM2's "
              f"{MAX_CONTEXT}-token trained context", file=sys.stderr)


def check_out_dir(path):
    """Create ``path`` and prove it writable now, not after the run."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".retrokv-write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise CLIError(f"--out {path!r} is not a writable folder: {e.strerror or e}") from None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from . import demo

            demo.check_args(args)
            return demo.run(args)
        if args.command == "warmup":
            from . import warmup

            return warmup.run(args)
        if args.command == "sparsity":
            from . import sparsity

            sparsity.check_args(args)
            return sparsity.run(args)
        check_eval_args(args)
        if args.frontier:
            from .frontier import run_cli

            return run_cli(args)
        return run_eval(args)
    except CLIError as e:
        print(f"retrokv {args.command}: error: {e}", file=sys.stderr)
        return 2


def run_eval(args):
    from . import eval as E
    from .data import natural_text_ids
    from .models import load_smollm2

    model, tok = load_smollm2()
    progress = not args.quiet
    rows, ppl_rows, layer_rows = [], [], {}
    for task in args.tasks:
        for n in args.lengths:
            samples = E.make_samples(tok, task, [n], args.samples, depths=args.depths)
            for r in E.run_task(model, tok, samples, args.methods, backend=args.backend, progress=progress):
                r.update(task=task, length=n)
                rows.append(r)
                print(f"{task} {n} {r['method']}: accuracy {r['accuracy']:.2f} density {r['density']:.3f} "
                      f"decode {r['decode_tok_s']:.2f} tok/s", flush=True)
    if args.ppl:
        for n in args.lengths:
            ids = natural_text_ids(tok, n + args.ppl_tokens)
            res = E.perplexity(model, ids, n, args.methods, backend=args.backend, progress=progress)
            base = next((res[m][0] for m in ("full", "plain") if m in res), None)
            for m, (ppl, _) in res.items():
                row = {"length": n, "method": m, "ppl": ppl}
                if base:
                    row["ppl_delta_%"] = 100 * (ppl / base - 1)
                ppl_rows.append(row)
    if args.layer_errors:
        from .models import capture_qkv

        n = args.lengths[0]
        captured = capture_qkv(model, natural_text_ids(tok, n))
        for m in args.methods:
            if m not in ("plain", "full"):
                layer_rows[m] = E.layer_errors(captured, m, backend=args.backend)
    _write(args, rows, ppl_rows, layer_rows)
    return 0


def _write(args, rows, ppl_rows, layer_rows):
    from . import eval as E

    cmd = "retrokv " + " ".join(sys.argv[1:])
    md = [f"# retrokv eval\n\nCommand: `{cmd}`  \nMachine: {_describe()}  \nBackend: {args.backend}\n"]
    if rows:
        md += ["## Retrieval tasks\n", E.markdown_table(
            rows, ["task", "length", "method", "samples", "accuracy", "density", "decode_tok_s", "build_s", "prefill_s"]), ""]
    if ppl_rows:
        md += [f"## Perplexity ({args.ppl_tokens} predicted tokens after the context)\n",
               E.markdown_table(ppl_rows, ["length", "method", "ppl", "ppl_delta_%"]), ""]
    for m, lr in layer_rows.items():
        md += [f"## Per-layer decode attention vs full: {m} ({args.lengths[0]} tokens)\n",
               E.markdown_table(lr, ["layer", "error", "density", "recall"]), ""]
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({"rows": rows, "ppl": ppl_rows, "layers": layer_rows}, f, indent=1, default=float)
    _plot(args, rows, layer_rows)
    print("\n".join(md))


def _plot(args, rows, layer_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows:
        tasks = sorted({r["task"] for r in rows})
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            sub = [r for r in rows if r["task"] == task]
            methods = list(dict.fromkeys(r["method"] for r in sub))
            lengths = sorted({r["length"] for r in sub})
            w = 0.8 / len(methods)
            for i, m in enumerate(methods):
                acc = [next((r["accuracy"] for r in sub if r["method"] == m and r["length"] == n), np.nan)
                       for n in lengths]
                ax.bar(np.arange(len(lengths)) + i * w, acc, w, label=m)
            ax.set_xticks(np.arange(len(lengths)) + 0.4 - w / 2, [str(n) for n in lengths])
            ax.set(title=task, xlabel="prompt tokens", ylabel="accuracy", ylim=(0, 1.05))
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "eval_accuracy.png"), dpi=110)
    if layer_rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for m, lr in layer_rows.items():
            ax.plot([r["layer"] for r in lr], [r["error"] for r in lr], marker="o", ms=3, label=m)
        ax.set(yscale="log", xlabel="layer", ylabel="median ||o - o_hat|| / ||o||")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "eval_layers.png"), dpi=110)


def _describe():
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
