"""Which layers lose the needle? The wave index on every layer but one, and on one layer only.

    python benchmarks/needle_layers.py [--prompts 4 5 12 18] [--budget 0.08]

For needle prompts of the needle frontier (``benchmarks/frontier_tasks.py``, 8192 tokens) that full
attention answers and the wave index does not, SmolLM2 is prefilled once (dense, shared) and the answer
is scored by teacher forcing (``retrokv.harness.frontier.forced_answer``, the frontier's scoring) with the
wave index (``WaveConfig`` defaults, retrieval fraction ``--budget``) attached through ``retrokv.hf`` and
some layers kept dense (``hf.attach(..., dense_layers=...)``):

* every layer sparse (the frontier's point), layer 0 dense, layers 0-1 dense (Quest's practice);
* **only layer l sparse** (all others dense), for each l: the layers that lose the needle by themselves;
* **every layer but l sparse** (l dense), for each l: the layers whose exactness alone brings it back.

Writes benchmarks/results/needle_layers.md.

    python benchmarks/needle_layers.py --dense-layers 7 --prompts $(seq 0 19) --budgets 0.018 0.04

scores every prompt with those layers dense and the wave index on the others, at each retrieval fraction,
beside every layer sparse (the frontier's points): how much of the needle gap the named layers hold, and
at what byte density. Writes benchmarks/results/needle_layers_dense.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from machine import describe  # noqa: E402

OUT = os.path.join(HERE, "results", "needle_layers.md")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[4, 5, 12, 18])
    ap.add_argument("--budget", type=float, default=0.08)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dense-layers", type=int, nargs="*", default=None,
                    help="sweep mode: these layers dense, every prompt, each of --budgets")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.018, 0.04])
    args = ap.parse_args()
    if args.dense_layers is not None:
        return dense_sweep(args)
    args.out = args.out or OUT

    from frontier_tasks import N, needle_prompts
    from retrokv.harness import eval as E
    from retrokv.harness import frontier as F
    from retrokv.harness.models import load_smollm2

    t0 = time.time()
    model, tok = load_smollm2()
    c = model.config
    shape = (c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads,
             c.hidden_size // c.num_attention_heads)
    n_layers = c.num_hidden_layers
    prompts = dict(needle_prompts(tok, max(args.prompts) + 1, N))
    _, cfg = F.hf_config("wave")
    cfg = dataclasses.replace(cfg, retrieval_budget=args.budget)
    lines = [f"# Which layers lose the needle (SmolLM2-135M, {N} tokens, wave index r = {args.budget:g})", "",
             f"Command: `python benchmarks/needle_layers.py --prompts {' '.join(map(str, args.prompts))} "
             f"--budget {args.budget:g}`  ", f"Machine: {describe()}", "",
             __doc__.split("\n\n", 2)[2].split("Writes")[0].strip(), "",
             "`nll`: mean negative log-likelihood of the answer's 7 digits; `ok`: every digit is the argmax.", ""]
    for i in args.prompts:
        s = prompts[i]
        logits0, saved, _ = E.shared_prefill(model, s.prompt_ids, "fast")

        def score(dense):
            return score_method(model, tok, saved, logits0, s.answer, "wave", cfg, dense, shape)

        full_ok, full_nll, _ = score_method(model, tok, saved, logits0, s.answer, "full", None, (), shape)
        base = {lab: score(d) for lab, d in (("every layer sparse", ()), ("layer 0 dense", (0,)),
                                              ("layers 0-1 dense", (0, 1)))}
        only = [score(tuple(x for x in range(n_layers) if x != layer)) for layer in range(n_layers)]
        but = [score((layer,)) for layer in range(n_layers)]
        lines += [f"## Prompt {i}: {s.task}, depth {s.depth:.3f}", "",
                  "| layers | ok | nll | byte density |", "|---|---|---|---|",
                  f"| full attention | {full_ok} | {full_nll:.3f} | 1.000 |"]
        lines += [f"| {lab} | {ok} | {nll:.3f} | {bd:.3f} |" for lab, (ok, nll, bd) in base.items()]
        worst = sorted(range(n_layers), key=lambda x: -only[x][1])[:5]
        lines += ["", "Only layer l sparse: " + ", ".join(f"{x} ({only[x][1]:.3f}{'' if only[x][0] else ', wrong'})"
                                                          for x in worst) + " (the five highest nll); wrong in "
                  f"{sum(not o for o, _, _ in only)} of {n_layers} layers.",
                  "", "Layer l dense, the rest sparse: right in " + str(sum(o for o, _, _ in but)) + f" of {n_layers}: "
                  + ", ".join(f"{x} ({but[x][1]:.3f})" for x in sorted(range(n_layers), key=lambda x: but[x][1])[:5])
                  + " (the five lowest nll).", ""]
        print("\n".join(lines[-12:]), flush=True)
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines + [f"Time so far {time.time() - t0:.0f} s."]) + "\n")
    lines += [f"Total time {time.time() - t0:.0f} s."]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def dense_sweep(args):
    """Every prompt at every budget, with ``args.dense_layers`` dense and with none: accuracy, NLL, density."""
    import numpy as np

    from frontier_tasks import N, needle_prompts
    from retrokv.harness import eval as E
    from retrokv.harness import frontier as F
    from retrokv.harness.models import load_smollm2

    out = args.out or os.path.join(HERE, "results", "needle_layers_dense.md")
    t0 = time.time()
    model, tok = load_smollm2()
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    shape = (c.num_attention_heads, c.num_key_value_heads, hd, hd)
    prompts = dict(needle_prompts(tok, max(args.prompts) + 1, N))
    _, base = F.hf_config("wave")
    dense = tuple(args.dense_layers)
    res = {}                                            # (budget, dense?) -> list of (ok, nll, byte density)
    for i in args.prompts:
        s = prompts[i]
        logits0, saved, _ = E.shared_prefill(model, s.prompt_ids, "fast")
        for r in args.budgets:
            cfg = dataclasses.replace(base, retrieval_budget=r)
            for d in ((), dense):
                ok, nll, bd = score_method(model, tok, saved, logits0, s.answer, "wave", cfg, d, shape)
                res.setdefault((r, d), []).append((ok, nll, bd))
                print(f"prompt {i} r={r:g} dense={list(d)}: {'OK' if ok else 'no'} nll={nll:.3f} bd={bd:.3f}", flush=True)
        del saved
        _sweep_table(args, dense, res, out, time.time() - t0)       # after every prompt: a stopped run keeps its rows


def _sweep_table(args, dense, res, out, seconds):
    import numpy as np

    from frontier_tasks import N

    lines = [f"# The wave index with layers {list(dense)} dense (SmolLM2-135M, {N} tokens, needle prompts)", "",
             f"Command: `python benchmarks/needle_layers.py --dense-layers {' '.join(map(str, dense))} --prompts "
             f"{' '.join(map(str, args.prompts))} --budgets {' '.join(f'{r:g}' for r in args.budgets)}`  ",
             f"Machine: {describe()}", "",
             "The needle frontier's prompts and scoring (`benchmarks/frontier_tasks.py`: teacher-forced 7 digits); "
             "the wave index with `WaveConfig` defaults at retrieval fraction r on every layer, and on every layer "
             "but the dense ones. Byte density counts a dense layer as reading its whole KV.", "",
             "| r | dense layers | prompts | accuracy | mean answer nll | byte density |", "|---|---|---|---|---|---|"]
    for (r, d), xs in res.items():
        lines.append(f"| {r:g} | {list(d) or 'none'} | {len(xs)} | {np.mean([x[0] for x in xs]):.2f} | "
                     f"{np.mean([x[1] for x in xs]):.3f} | {np.mean([x[2] for x in xs]):.3f} |")
    done = args.prompts[:min(len(xs) for xs in res.values())]
    with open(os.path.join(HERE, "results", "frontier_needle.json")) as fh:
        stored = json.load(fh)["needle"]
    full = [stored.get(f"{N}|{i}|full|dense", {}).get("correct") for i in done]
    lines += ["", f"Full attention answers {sum(bool(x) for x in full)} of these {len(done)} prompts "
              "(`benchmarks/results/frontier_needle.json`, the same scoring). The dense layer was picked on four of "
              "these same prompts (`needle_layers.md`): this measures how much of the gap one layer holds, it is not "
              "a held-out result.", "", f"Time {seconds:.0f} s."]
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines[-6:]), flush=True)


def score_method(model, tok, saved, logits0, answer, method, cfg, dense, shape):
    """``(correct, answer nll, byte density)``: ``method`` (config ``cfg``) attached with ``dense`` layers kept
    exact, built from the shared prefill ``saved``, the answer scored as the needle frontier scores it."""
    from frontier_tasks import N
    from retrokv import hf
    from retrokv.harness import frontier as F

    h = hf.attach(model, method, cfg, "fast", dense_layers=dense)
    try:
        h.rebuild(saved)
        ok, nll = F.forced_answer(model, tok, hf.index_cache(len(saved), N), logits0, answer)
        bd, _ = F.run_density(h, *shape)
    finally:
        hf.detach(model)
    return ok, nll, bd


if __name__ == "__main__":
    main()
