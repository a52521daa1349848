"""Needle-accuracy and perplexity frontiers (issue 16, y axes 2 and 3) against byte density.

SmolLM2-135M with each method attached through retrokv.hf for every layer (the prefill is dense and
shared: one per prompt, every method and budget builds from it, retrokv.harness.eval.shared_prefill;
each method's index is built once per prompt and copied per budget, retrokv.harness.frontier.attached_points).
x axis: byte density (retrokv.harness.frontier.byte_density of every decode step's stats, averaged over
layers and steps: retrokv.harness.frontier.run_density), the error frontier's definition.

    python benchmarks/frontier_tasks.py needle        # RULER-style NIAH + multi-key on natural text, 8192 tokens
    python benchmarks/frontier_tasks.py ppl           # perplexity of 256 natural-text tokens after 8192
    python benchmarks/frontier_tasks.py needle --methods graph --prompts 4    # the graph's slow build, fewer prompts
    python benchmarks/frontier_tasks.py report        # -> benchmarks/results/frontier_{needle,ppl}.md, docs/img
    FRONTIER_TASKS_DIR=/tmp/x python benchmarks/frontier_tasks.py ppl --methods graph   # concurrently, own file
    FRONTIER_TASKS_DIR=benchmarks/results/heldout python benchmarks/frontier_tasks.py needle --first 20 --prompts 40
        # prompts 20-39: new seeds of the same 20 (task, corpus, depth) pairs, measured into their own files
    python benchmarks/frontier_tasks.py merge /tmp/x/frontier_ppl.json                   # then add it

Every (prompt, method, knob) and (corpus, method, knob) result is cached in
benchmarks/results/frontier_needle.json / frontier_ppl.json as soon as it is measured: a stopped run resumes where it was.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

RESULTS = os.path.join(HERE, "results")
# one file per stage (two stages may run at once); FRONTIER_TASKS_DIR redirects both (tests, smoke runs)
JSON = {st: os.path.join(os.environ.get("FRONTIER_TASKS_DIR", RESULTS), f"frontier_{st}.json") for st in ("needle", "ppl")}
N = 8192
PPL_TOKENS = 256
# prompt i: (n_keys, corpus) = COMBOS[i % 4]; depth: see needle_prompts
COMBOS = ((1, "pydoc"), (1, "licenses"), (4, "pydoc"), (4, "licenses"))
DEPTHS = tuple(float(x) for x in np.linspace(0.05, 0.95, 5))

# budget points: a few per method, around and below 10% byte density (see frontier_error.md for the map)
NEEDLE_POINTS = {
    "full": [("dense", None)],
    "wave": [("r=0.005", 0.005), ("r=0.018", 0.018), ("r=0.04", 0.04), ("r=0.08", 0.08)],
    "wave_noest": [("r=0.018", 0.018)],
    "wave_maxlogit": [("r=0.018", 0.018), ("r=0.04", 0.04), ("r=0.08", 0.08)],
    "wave_ball": [("r=0.018", 0.018), ("r=0.04", 0.04), ("r=0.08", 0.08)],
    "wave_mix": [("r=0.018", 0.018), ("r=0.03", 0.03), ("r=0.035", 0.035), ("r=0.04", 0.04), ("r=0.08", 0.08)],
    # the answers are a few tokens, so no index update happens in them: the same answers as wave_mix at r=0.04
    "wave_mix_u64": [("r=0.04", 0.04)],
    "wave_mix_noest": [("r=0.04", 0.04)],     # the estimation zone's share of wave_mix's needles
    "streaming": [("window=777", 777), ("window=2454", 2454)],
    # the oracle over its own k: the token budget the task needs with perfect retrieval (a ceiling for the indexes)
    "topk": [("k=131", 131), ("k=418", 418), ("k=1300", 1300)],
    "quest": [("budget=624", 624)],
    "ivf": [("nprobe=8", 8)],
    "graph": [("k=41", 41), ("k=131", 131), ("k=234", 234)],
    "graph_paper": [("k=41", 41), ("k=131", 131)],
    "graph_l7": [("k=41", 41), ("k=131", 131)],
}
PPL_POINTS = {
    "full": [("dense", None)],
    "wave": [("r=0.018", 0.018), ("r=0.08", 0.08), ("r=0.3", 0.3)],
    "wave_noest": [("r=0.018", 0.018)],
    "wave_maxlogit": [("r=0.018", 0.018), ("r=0.08", 0.08)],
    "wave_ball": [("r=0.018", 0.018), ("r=0.04", 0.04), ("r=0.08", 0.08)],
    "wave_mix": [("r=0.018", 0.018), ("r=0.03", 0.03), ("r=0.035", 0.035), ("r=0.04", 0.04), ("r=0.08", 0.08)],
    "wave_mix_u64": [("r=0.035", 0.035), ("r=0.04", 0.04)],
    "streaming": [("window=777", 777), ("window=2454", 2454)],
    "topk": [("k=131", 131), ("k=748", 748)],
    "quest": [("budget=624", 624)],
    "ivf": [("nprobe=8", 8)],
    "graph": [("k=73", 73), ("k=234", 234), ("k=418", 418)],
    # RetrievalAttention's default static window (128 sinks + 512 recent, sized for 128K contexts): at
    # 8K it alone is 7.8% of the KV, so it is set against the 4 + 64 window above at equal density
    "graph_paper": [("k=41", 41), ("k=131", 131)],
    "graph_l7": [("k=73", 73), ("k=131", 131)],
}
NEEDLE_DEFAULT = "full,wave,streaming,topk,quest"
PPL_DEFAULT = "full,wave,streaming,topk,quest"


def load_json(stage):
    if os.path.exists(JSON[stage]):
        with open(JSON[stage]) as f:
            return json.load(f)
    return {stage: {}, "runs": []}


def save_json(db, stage):
    tmp = JSON[stage] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(db, f, indent=0)
    os.replace(tmp, JSON[stage])


def _check_prompt(db, n, i, ids):
    """Refuse to resume on a different prompt: the ``licenses`` haystack is built from the licence texts of
    the installed distributions, so another environment may build other token ids for prompt ``i``. The
    first run that measures a prompt records the SHA-256 of its ids (older results, recorded before this
    check, were confirmed by re-measuring prompt 1's full-attention answer NLL to the last digit)."""
    import hashlib

    digest = hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]
    seen = db.setdefault("prompt_sha", {}).setdefault(f"{n}|{i}", digest)
    if seen != digest:
        raise SystemExit(f"prompt {i} ({n} tokens) is not the prompt the stored results were measured on "
                         f"(ids sha {digest}, stored {seen}): the installed packages changed the licenses "
                         f"corpus; measure into a fresh results file instead of resuming")


def _groups(methods, table):
    """Methods sharing one build (the wave variants with equal build fields, retrokv.harness.frontier.wave_build_key)
    as one group of (variant, label, value) points; the group's first method builds."""
    from retrokv.harness.frontier import WAVE_VARIANTS, wave_build_key

    out, lead = [], {}
    for m in methods:
        if m not in table:
            raise SystemExit(f"no budget points for {m!r} in this stage; methods with points: {', '.join(table)}")
        pts = [(m, lab, v) for lab, v in table[m]]
        key = wave_build_key(m) if m in WAVE_VARIANTS else None
        if key is not None and key in lead:
            lead[key][1].extend(pts)
        else:
            out.append((m, pts))
            if key is not None:
                lead[key] = out[-1]
    return out


def _run_group(model, saved, n, method, pts, backend, done, fn):
    """Attach ``method`` once (build once), copy its indexes per point; ``fn(variant, label, value, h, cache)``
    measures one point. Points already in ``done`` are skipped; the build is skipped when all are."""
    from retrokv.harness import frontier as F

    todo = [p for p in pts if p[:2] not in done]
    if not todo:
        return
    if method == "streaming":
        for variant, lab, v in todo:
            for _, _, _, h, cache in _points(F, model, saved, n, method, [(lab, v)], backend):
                fn(variant, lab, v, h, cache)
        return
    by = {}
    for variant, lab, v in todo:
        by.setdefault(variant, []).append((lab, v))
    # one build for the group: the attached index is copied per point with the variant's knob (_at)
    name, cfg = F.hf_config(method)
    from retrokv import hf

    h = hf.attach(model, name, cfg, backend)
    try:
        t0 = time.time()
        h.rebuild(saved)
        print(f"    build {method}: {time.time() - t0:.0f}s", flush=True)
        built = dict(h.indexes)
        for variant, plist in by.items():
            for lab, v in plist:
                h.indexes = {layer: [F._at(variant, ix, v, layer) for ix in lst] for layer, lst in built.items()}
                h.reset_stats()
                fn(variant, lab, v, h, hf.index_cache(len(saved), n))
    finally:
        hf.detach(model)


def _points(F, model, saved, n, method, pts, backend):
    for lab, v, h, cache in F.attached_points(model, saved, n, method, pts, backend):
        yield method, lab, v, h, cache


def needle_prompts(tok, count, n=N):
    from retrokv.harness import frontier as F

    out = []
    for i in range(count):
        n_keys, corpus = COMBOS[i % 4]
        # block b = i // 4 puts the single needles at depth b and the multi-key ones at depth b + 2, so that a
        # run stopped early still spans several depths; the 20 prompts are the 20 (task, corpus, depth) pairs
        depth = DEPTHS[(i // 4 + (2 if i % 4 >= 2 else 0)) % 5]
        out.append((i, F.needle_prompt(tok, n, depth, n_keys, corpus, seed=i)))
    return out


def _shape(model):
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, c.num_key_value_heads, hd, hd


def _start(stage):
    """Open the stage's results (resumable), log this run in them, load SmolLM2: ``(db, run, model, tok, shape)``."""
    from retrokv.harness.models import load_smollm2

    db = load_json(stage)
    run = {"stage": stage, "argv": sys.argv[1:], "start": time.strftime("%Y-%m-%d %H:%M:%S"),
           "load": os.getloadavg()[0]}
    db["runs"].append(run)
    save_json(db, stage)
    model, tok = load_smollm2()
    return db, run, model, tok, _shape(model)


def needle(args):
    from retrokv.harness import eval as E
    from retrokv.harness import frontier as F

    groups = _groups(args.methods.split(","), NEEDLE_POINTS)       # checked before the run is logged
    db, run, model, tok, (hq, hkv, d, dv) = _start("needle")
    for i, s in needle_prompts(tok, args.prompts, args.n)[args.first:]:
        key = lambda m, lab: f"{args.n}|{i}|{m}|{lab}"   # noqa: E731
        _check_prompt(db, args.n, i, s.prompt_ids)
        if all(key(m, lab) in db["needle"] for _, pts in groups for m, lab, _ in pts):
            continue
        t0 = time.time()
        logits0, saved, _ = E.shared_prefill(model, s.prompt_ids, args.backend)
        print(f"prompt {i} ({s.task}, depth {s.depth:.2f}): prefill {time.time() - t0:.0f}s "
              f"load={os.getloadavg()[0]:.1f}", flush=True)
        for method, pts in groups:
            done = {(m, lab) for m, lab, _ in pts if key(m, lab) in db["needle"]}

            def fn(variant, lab, v, h, cache):
                t1 = time.time()
                ok, nll = F.forced_answer(model, tok, cache, logits0, s.answer)
                bd, td = F.run_density(h, hq, hkv, d, dv)
                db["needle"][key(variant, lab)] = {
                    "n_tokens": args.n, "prompt": i, "task": s.task, "depth": s.depth, "method": variant,
                    "knob": lab, "value": v, "answer": s.answer, "answer_nll": nll, "correct": bool(ok),
                    "byte_density": bd, "token_density": td, "steps": int(sum(len(x) for x in h.stats.values())
                                                                          // max(1, len(h.stats)))}
                save_json(db, "needle")
                print(f"    {variant} {lab}: {'OK ' if ok else 'no '} bd={bd:.3f} nll={nll:.3f} {time.time() - t1:.0f}s", flush=True)

            _run_group(model, saved, args.n, method, pts, args.backend, done, fn)
        del saved
    run.update(end=time.strftime("%Y-%m-%d %H:%M:%S"), load_end=os.getloadavg()[0])
    save_json(db, "needle")


def ppl(args):
    from retrokv.harness import eval as E
    from retrokv.harness import frontier as F
    from retrokv.harness.data import natural_text_ids

    groups = _groups(args.methods.split(","), PPL_POINTS)          # checked before the run is logged
    db, run, model, tok, (hq, hkv, d, dv) = _start("ppl")
    for corpus in args.corpora.split(","):
        key = lambda m, lab: f"{args.n}|{corpus}|{m}|{lab}"   # noqa: E731
        # a point is done when it was measured over at least as many tokens (a longer run replaces a shorter one)
        have = lambda m, lab: len(db["ppl"].get(key(m, lab), {}).get("nll", ())) >= args.ppl_tokens   # noqa: E731
        if all(have(m, lab) for _, pts in groups for m, lab, _ in pts):
            continue
        ids = natural_text_ids(tok, args.n + args.ppl_tokens, corpus=corpus)
        t0 = time.time()
        logits0, saved, _ = E.shared_prefill(model, ids[:args.n], args.backend)
        print(f"{corpus}: prefill {time.time() - t0:.0f}s load={os.getloadavg()[0]:.1f}", flush=True)
        for method, pts in groups:
            done = {(m, lab) for m, lab, _ in pts if have(m, lab)}

            def fn(variant, lab, v, h, cache):
                t1 = time.time()
                nll, _ = F.teacher_forced(model, cache, logits0, ids[args.n:])
                bd, td = F.run_density(h, hq, hkv, d, dv)
                db["ppl"][key(variant, lab)] = {
                    "n_tokens": args.n, "corpus": corpus, "method": variant, "knob": lab, "value": v,
                    "ppl": float(np.exp(nll.mean())), "nll": nll.tolist(), "byte_density": bd,
                    "token_density": td}
                save_json(db, "ppl")
                print(f"    {variant} {lab}: ppl={np.exp(nll.mean()):.4f} bd={bd:.3f} {time.time() - t1:.0f}s "
                      f"load={os.getloadavg()[0]:.1f}", flush=True)

            _run_group(model, saved, args.n, method, pts, args.backend, done, fn)
        del saved
    run.update(end=time.strftime("%Y-%m-%d %H:%M:%S"), load_end=os.getloadavg()[0])
    save_json(db, "ppl")


ORDER = ("full", "wave", "wave_noest", "wave_maxlogit", "wave_ball", "wave_mix", "wave_mix_u64", "wave_mix_noest",
         "graph", "graph_l7", "graph_paper", "ivf", "quest", "streaming", "topk")


def _sort(rows):
    return sorted(rows, key=lambda r: (r.get("corpus", ""), ORDER.index(r["method"]), r["byte_density"]))


def _env():
    """The environment of this run's output folders, as a command prefix (empty for the default folders)."""
    return "".join(f"{k}={os.environ[k]} " for k in ("FRONTIER_TASKS_DIR", "FRONTIER_TASKS_IMG") if os.environ.get(k))


def _commands(db):
    """The exact command lines of the stored runs, in order, deduplicated, then the report's."""
    cmds = []
    for r in db.get("runs", []):
        src = r.get("merged_from")
        run = "python benchmarks/frontier_tasks.py " + " ".join(r.get("argv", []))
        steps = [f"`{_env()}{run}`"]
        if src:                                   # measured into its own folder, then merged into this one
            stage_file = f"frontier_{r.get('stage', 'needle')}.json"
            if os.path.basename(src) == stage_file:
                steps = [f"`FRONTIER_TASKS_DIR={os.path.dirname(src)} {run}`"]
            else:                                 # kept under its own name: measured in a scratch folder, copied
                tmp = "/tmp/" + os.path.splitext(os.path.basename(src))[0]      # a fresh folder per part
                steps = [f"`FRONTIER_TASKS_DIR={tmp} {run}`", f"`cp {tmp}/{stage_file} {src}`"]
            steps.append(f"`{_env()}python benchmarks/frontier_tasks.py merge {src}`")
        for x in steps:
            if x not in cmds:
                cmds.append(x)
    return "; ".join(cmds) + f", then `{_env()}python benchmarks/frontier_tasks.py report`"


def _runs(db):
    runs = db.get("runs", [])
    loads = [r[k] for r in runs for k in ("load", "load_end") if r.get(k) is not None]
    spans = "; ".join(f"`{' '.join(r.get('argv', []))}` {r.get('start', '?')} to {r.get('end', '(stopped)')}"
                      for r in runs)
    load = f"1-minute load average {min(loads):.1f}-{max(loads):.1f} at the runs' starts and ends" if loads else ""
    return spans, load


def needle_report(db, machine):
    from retrokv.harness import frontier as F
    from retrokv.harness.eval import markdown_table

    res = list(db["needle"].values())
    rows = _sort(F.needle_rows(res))
    spans, load = _runs(db)
    tasks = sorted({r["task"] for r in res})
    n_prompts = len({r["prompt"] for r in res if r["method"] == "full"})
    lines = ["# Needle-accuracy frontier: accuracy against byte density (SmolLM2-135M, 8192 tokens)", "",
             f"Command: {_commands(db)}  ",
             f"Machine: {machine}  ",
             f"Runs: {spans}; {load} (2 cores shared with other jobs: timings are not reported).  ", "",
             f"**Prompts.** {n_prompts} prompts of {N} tokens measured with full attention (target: 20; a run "
             "stopped by the deadline measures fewer, and the `prompts` column says how many each point has). "
             "Prompt i is RULER-style NIAH on a natural-text haystack (`retrokv.harness.frontier.needle_prompt`, "
             "i.e. `retrokv.harness.eval.needle(haystack=\"natural\")` with the haystack drawn from the corpus): "
             "tasks cycle through single needle on `pydoc`, single needle on `licenses`, 4-key multi-key "
             "(3 distractor needles) on `pydoc`, 4-key on `licenses`; in block b = i // 4 the single needles sit at "
             "depth index b and the multi-key ones at b + 2 (mod 5) of 0.05, 0.275, 0.5, 0.725, 0.95, so that the "
             "20 prompts are the 20 (task, corpus, depth) pairs; seed i. "
             f"Tasks present: {', '.join(tasks)}; depths measured: "
             f"{', '.join(f'{d:.3f}' for d in sorted({r['depth'] for r in res}))}.", "",
             "**Scoring (teacher forcing, not free generation).** SmolLM2-135M, asked the question on a natural-text "
             "haystack, usually first restates the question (\"The special magic number for X is: ...\") before "
             "answering, so greedy free generation needs ~25 tokens per point, which the compute budget did not "
             "allow at 8K. Instead `\" \" + answer` is fed after the question, one decode step per token through "
             "the method (`retrokv.harness.frontier.forced_answer`): a prompt is **correct** when each of the 7 "
             "digits is the argmax given the right prefix (greedy decoding that starts answering writes the whole "
             "number); `answer nll` is the mean negative log-likelihood of the 7 digits. The leading space is "
             "predicted by the dense prefill (as the first generated token is in `retrokv.harness.eval.run_task`) "
             "and not scored; all 7 digits go through the method, on every layer.", "",
             "**Byte density**: `retrokv.harness.frontier.byte_density` of every (layer, decode step)'s "
             "`last_stats`, averaged over the 30 layers and the 7 steps (`run_density`), then over prompts: the "
             "error frontier's definition (docs/frontier.md). Every retrieval baseline gets 4 sinks + 64 recent "
             "tokens (`graph_paper`: the graph with RetrievalAttention's default 128 + 512); the wave index its defaults; knobs as in `retrokv.harness.frontier.sweep`. Each method's "
             "index is built once per prompt from the shared dense prefill and copied per knob. "
             "`full acc (same prompts)`: full attention on the prompts that point was measured on; "
             "`delta`: the point's accuracy minus that, in points.", "",
             markdown_table([{"method": r["method"], "knob": r["knob"], "prompts": r["prompts"],
                              "byte density": r["byte_density"], "token density": r["token_density"],
                              "accuracy": r["accuracy"], "full acc (same prompts)": r["full_accuracy"],
                              "delta (points)": f"{r['delta_points']:+.0f}", "answer nll": r["answer_nll"]}
                             for r in rows],
                            ["method", "knob", "prompts", "byte density", "token density", "accuracy",
                             "full acc (same prompts)", "delta (points)", "answer nll"]), ""]
    per = []
    for r in rows:
        row = {"method": r["method"], "knob": r["knob"]}
        for t in tasks:
            xs = [x["correct"] for x in res if x["method"] == r["method"] and x["knob"] == r["knob"] and x["task"] == t]
            row[t] = f"{sum(xs)}/{len(xs)}" if xs else ""
        per.append(row)
    lines += ["Correct prompts per task:", "", markdown_table(per, ["method", "knob"] + tasks), ""]
    return "\n".join(lines), rows


def _ppl_rows(F, results):
    """``F.ppl_rows`` with each row set against full attention over the SAME predicted tokens: a point
    measured over fewer tokens than full (a shorter, older run) is compared with full's first ones."""
    out = []
    for r in results:
        t = len(r["nll"])
        full = [dict(f, ppl=float(np.exp(np.mean(f["nll"][:t])))) for f in results
                if f["method"] == "full" and f["corpus"] == r["corpus"] and len(f["nll"]) >= t]
        row = F.ppl_rows([r] + ([] if r["method"] == "full" else full))[0]
        out.append(dict(row, tokens=t))
    return out


def ppl_report(db, machine):
    from retrokv.harness import frontier as F
    from retrokv.harness.eval import markdown_table

    rows = _sort(_ppl_rows(F, list(db["ppl"].values())))
    spans, load = _runs(db)
    t = max(r["tokens"] for r in rows)
    lines = [f"# Perplexity frontier: perplexity increase against byte density (SmolLM2-135M, {N} + {t} tokens)", "",
             f"Command: {_commands(db)}  ",
             f"Machine: {machine}  ",
             f"Runs: {spans}; {load} (2 cores shared with other jobs: timings are not reported).  ", "",
             f"Corpora measured: {', '.join(sorted({r['corpus'] for r in rows}))} (of `pydoc`, `licenses`: a run "
             "stopped by the deadline measures fewer). "
             f"Per corpus (`retrokv.harness.data.natural_text_ids`): the first {N} tokens are "
             f"prefilled densely once, then the next {t} tokens are predicted one at a time under teacher "
             "forcing with the method active for every predicted token on every layer (the first is predicted "
             "by the dense prefill, as in `retrokv.harness.eval.perplexity`); each method's index is built once "
             "from the shared prefill and copied per knob; every retrieval baseline keeps 4 sinks + 64 recent tokens exact "
             "(`graph_paper`: the graph with RetrievalAttention's default 128 + 512). `ppl +%`: the increase over full attention on the "
             f"same corpus. Byte density: mean over layers and the {t - 1} decode steps (`run_density`).", "",
             markdown_table([{"corpus": r["corpus"], "method": r["method"], "knob": r["knob"],
                              "byte density": r["byte_density"], "token density": r["token_density"],
                              "tokens": r["tokens"], "ppl": r["ppl"], "ppl +%": f"{r['delta_pct']:+.2f}"}
                             for r in rows],
                            ["corpus", "method", "knob", "byte density", "token density", "tokens", "ppl", "ppl +%"]),
             "", f"`tokens`: predicted tokens the row was measured over ({t} unless a shorter run is all there is "
             "for it); its `ppl +%` is against full attention over the same first tokens.", ""]
    return "\n".join(lines), rows


def target(nrows, prows):
    """The issue's target: per method, the lowest byte density < 10% with needle accuracy within 2 points
    of full (20 prompts) and perplexity within 2% (on every corpus measured)."""
    from retrokv.harness import frontier as F
    from retrokv.harness.eval import markdown_table

    need = F.lowest_matching(nrows, lambda r: r["delta_points"] >= -2 and r["prompts"] >= 20)
    need_any = F.lowest_matching(nrows, lambda r: r["delta_points"] >= -2)
    corpora = sorted({r["corpus"] for r in prows})
    by = {}
    for r in prows:
        by.setdefault((r["method"], r["knob"]), []).append(r)
    agg = [{"method": m, "knob": k, "byte_density": max(x["byte_density"] for x in rs),
            "delta_pct": max(x["delta_pct"] for x in rs), "corpora": len(rs)} for (m, k), rs in by.items()]
    ppl_ok = F.lowest_matching(agg, lambda r: r["delta_pct"] <= 2 and r["corpora"] == len(corpora))
    both = {}
    # the ablations (no estimation zone) are not operating points of the target
    verdicts = [m for m in ORDER if m in F.WAVE_VARIANTS and F.WAVE_VARIANTS[m].get("estimation", True)] + \
        ["graph"] + list(F.WIDE_LAYERS)
    for m in verdicts:       # one knob: its needle run AND its perplexity run below 0.10 (the window grows in the latter)
        ks = [r for r in nrows if r["method"] == m and r["delta_points"] >= -2 and r["prompts"] >= 20
              and r["byte_density"] < 0.10]
        ks = [r for r in ks if any(a["method"] == m and a["knob"] == r["knob"] and a["delta_pct"] <= 2 and
                                   a["corpora"] == len(corpora) and a["byte_density"] < 0.10 for a in agg)]
        both[m] = min(ks, key=lambda r: r["byte_density"]) if ks else None
    lines = ["## Target (issue 16)", "",
             "\"At 8K, some operating point of the wave index and of the graph index reaches needle accuracy within "
             "2 points of full attention (20 prompts) and perplexity within 2% at a density below 10%.\" Per "
             "method, the lowest byte density below 0.10 meeting each half (perplexity: on every corpus "
             "measured, " + ", ".join(corpora) + "), and both at one knob (whose needle run and perplexity run both "
             "read below 0.10: over 256 generated tokens the steady window grows, so a knob reads more there):", ""]
    tab = []
    for m in ORDER[1:]:
        if not any(r["method"] == m for r in nrows + prows):
            continue
        n1, n0, p1 = need.get(m), need_any.get(m), ppl_ok.get(m)
        tab.append({"method": m,
                    "needle within 2 pts (>= 20 prompts)": f"{n1['knob']} @ {n1['byte_density']:.3f}" if n1 else "none",
                    "needle within 2 pts (any count)": f"{n0['knob']} @ {n0['byte_density']:.3f} ({n0['prompts']} prompts)"
                    if n0 else "none",
                    "ppl within 2%": f"{p1['knob']} @ {p1['byte_density']:.3f}" if p1 else "none"})
    lines += [markdown_table(tab, list(tab[0].keys())) if tab else "(no rows)", ""]
    for m in verdicts:
        r = both.get(m)
        measured = any(x["method"] == m for x in nrows) and any(x["method"] == m for x in prows)
        pd = max((a["byte_density"] for a in agg if r and a["method"] == m and a["knob"] == r["knob"]), default=0)
        lines.append(f"* **{m}**: " + (f"MET at {r['knob']}: byte density {r['byte_density']:.3f} on the needle "
                                        f"answers, {pd:.3f} over the perplexity run." if r else
                                        ("MISSED (no knob below 0.10 meets both halves)." if measured else
                                         "NOT MEASURED on both axes in this run (MISSED).")))
    return "\n".join(lines + [""])


def plot_needle(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrokv.harness.frontier import COLORS, LABELS

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.0))
    for m in ORDER:
        sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["byte_density"])
        if not sel:
            continue
        lab = "full attention" if m == "full" else LABELS[m]
        col = "tab:red" if m == "full" else COLORS[m]
        n = min(r["prompts"] for r in sel)
        for ax, key in zip(axes, ("accuracy", "answer_nll")):
            ax.plot([r["byte_density"] for r in sel], [r[key] for r in sel], "o-" if m != "full" else "*",
                    ms=4 if m != "full" else 10, color=col, label=f"{lab} [{n}+ prompts]")
            if m == "full":
                ax.axhline(sel[0][key], color=col, ls=":", lw=1)
    for ax, yl in zip(axes, ("needle accuracy (teacher-forced, 7 digits)", "mean NLL of the answer digits")):
        ax.set_xscale("log")
        ax.set_xlabel("byte density (bytes read / whole KV, metadata included)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].axvline(0.10, color="gray", lw=0.8, ls="--")
    # below the plots: inside either axis the legend hid a point (StreamingLLM's 30% window, lower right)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(f"Needle frontier, SmolLM2-135M, {N} tokens, natural-text haystacks (pydoc + licenses)")
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")          # the legend below the axes stays in the image
    plt.close(fig)


def plot_ppl(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from retrokv.harness.frontier import COLORS, LABELS

    corpora = sorted({r["corpus"] for r in rows})
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 5.4), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], corpora):
        for m in ORDER:
            sel = sorted((r for r in rows if r["method"] == m and r["corpus"] == c), key=lambda r: r["byte_density"])
            if sel:
                ax.plot([r["byte_density"] for r in sel], [r["delta_pct"] for r in sel],
                        "o-" if m != "full" else "*", ms=4 if m != "full" else 10,
                        color="tab:red" if m == "full" else COLORS[m], label="full attention" if m == "full" else LABELS[m])
        ax.axhline(2.0, color="gray", lw=0.8, ls="--")
        ax.axvline(0.10, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{c}, {N} tokens of context")
        ax.set_xlabel("byte density (bytes read / whole KV, metadata included)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity increase over full (%)")
    # below the plots: inside an axis the legend hid the wave's r = 0.3 point (pydoc, upper right)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(ndb, pdb):
    sys.path.insert(0, HERE)
    from machine import describe

    machine = describe()
    out = os.environ.get("FRONTIER_TASKS_DIR", RESULTS)
    img = os.environ.get("FRONTIER_TASKS_IMG", os.path.join(ROOT, "docs", "img"))
    nmd, nrows = needle_report(ndb, machine) if ndb["needle"] else ("", [])
    pmd, prows = ppl_report(pdb, machine) if pdb["ppl"] else ("", [])
    tgt = target(nrows, prows)
    if nmd:
        with open(os.path.join(out, "frontier_needle.md"), "w") as f:
            f.write(nmd + "\n" + tgt)
        plot_needle(nrows, os.path.join(img, "frontier_needle.png"))
    if pmd:
        with open(os.path.join(out, "frontier_ppl.md"), "w") as f:
            f.write(pmd)
        plot_ppl(prows, os.path.join(img, "frontier_ppl.png"))
    print(nmd + "\n" + tgt + "\n" + pmd)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("needle", "ppl", "report", "merge"))
    ap.add_argument("paths", nargs="*", help="merge: frontier_{needle,ppl}.json files of runs made elsewhere "
                                             "(FRONTIER_TASKS_DIR, e.g. run concurrently) to add to the results")
    ap.add_argument("--backend", default="fast")
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--prompts", type=int, default=20, help="needle: prompts 0 .. PROMPTS - 1")
    ap.add_argument("--first", type=int, default=0, help="needle: start at this prompt (held-out sets: "
                                                         "--first 20 --prompts 40 measures prompts 20-39)")
    ap.add_argument("--corpora", default="pydoc,licenses")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS)
    a = ap.parse_args()
    if a.stage == "report":
        report(load_json("needle"), load_json("ppl"))
    elif a.stage == "merge":
        for path in a.paths:
            with open(path) as f:
                other = json.load(f)
            st = "needle" if other.get("needle") else "ppl"
            db = load_json(st)
            db[st].update(other[st])
            db["runs"] += [dict(r, merged_from=path) for r in other["runs"]]
            save_json(db, st)
            print(f"merged {len(other[st])} {st} results from {path}")
    else:
        a.methods = a.methods or (NEEDLE_DEFAULT if a.stage == "needle" else PPL_DEFAULT)
        needle(a) if a.stage == "needle" else ppl(a)
