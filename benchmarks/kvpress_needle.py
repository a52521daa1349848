"""kvpress side by side (issue 16): the needle prompts of ``frontier_tasks.py needle`` through kvpress's eviction presses.

Eviction decided before the question is seen (kvpress) against retrieval at every decode step (retrokv).
Each 8192-token needle prompt of ``benchmarks/frontier_tasks.py needle`` (``needle_prompts``: prompt i is
identical) is split the way kvpress's pipeline splits its input: the **context** (instructions + haystack
with the needle(s)) is prefilled with the press active and compressed, then the **question** is fed through
the compressed cache, then ``" " + answer`` under teacher forcing, scored exactly as
``retrokv.harness.frontier.forced_answer`` (correct when every answer digit is the argmax given the right
prefix; answer nll = mean NLL of the digits).

kvpress 0.5.x needs transformers < 5.3, so this runs in its own virtualenv (``make bench-kvpress``, pins in
``benchmarks/requirements-kvpress.txt``); ``report`` needs no kvpress and runs in the main ``.venv``:

    .venv/bin/python benchmarks/kvpress_needle.py prompts --prompts 20        # main venv: the prompts' token ids
    .venv-kvpress/bin/python benchmarks/kvpress_needle.py run --prompts 20    # -> results/frontier_kvpress.json
    .venv-kvpress/bin/python benchmarks/kvpress_needle.py check --n 1024      # shared prefill == kvpress's own hooks
    .venv/bin/python benchmarks/kvpress_needle.py report                      # -> frontier_kvpress.md, docs/img png

**One dense prefill per prompt, every press and ratio compressed from it.** A kvpress press is a forward hook on
each attention layer that, during the prefill, replaces that layer's cache entry by a pruned copy
(``BasePress.forward_hook`` -> ``compress``). The pruning never changes the hidden states the prefill passes on
(the layer's attention output is computed before its hook runs), so the hook sees the same inputs whatever press
is active. We therefore run the context prefill once with recording hooks, then for each (press, ratio) call the
press's own ``forward_hook`` on each layer's recorded ``(module, input, kwargs, output)`` with a fresh cache
holding that layer's dense keys/values, inside ``with press(model):`` (which sets up the modules as kvpress does).
``check`` verifies that this gives bit-identical caches to running ``with press(model): model.model(context)``.

Every (prompt, press, ratio) result is cached in ``benchmarks/results/frontier_kvpress.json`` (``--out`` or
``KVPRESS_JSON`` redirect it) as soon as it is measured; a rerun skips finished points.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

RESULTS = os.path.join(HERE, "results")
JSON = os.environ.get("KVPRESS_JSON", os.path.join(RESULTS, "frontier_kvpress.json"))
RETROKV_JSON = os.path.join(RESULTS, "frontier_needle.json")
# the prompts' token ids, built in the MAIN .venv (`prompts` stage; benchmarks/out/ is not committed): the
# `licenses` haystack is the licence texts of the installed distributions (retrokv.harness.data), so the kvpress
# venv, with other packages installed, would build different licenses prompts than frontier_needle.json's
PROMPTS_DIR = os.environ.get("KVPRESS_PROMPTS_DIR", os.path.join(HERE, "out"))
N = 8192
# press key -> kvpress class name (kvpress 0.5.5); default parameters of each press
PRESSES = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress",
           "expected_attention": "ExpectedAttentionPress", "knorm": "KnormPress"}
# compression ratios whose densities (see density()) land on retrokv's needle points at 8192 tokens:
# 0.053, 0.068, 0.090 (wave r=0.005/0.018/0.04), 0.095 (streaming window=777), 0.130 (wave r=0.08),
# 0.300 (streaming window=2454); ratio_for_density() with the prompts' 8173 + 19 tokens (3 decimals)
RATIOS = (0.95, 0.935, 0.913, 0.907, 0.872, 0.702)
# the question of retrokv.harness.eval.needle, tokenised on its own as kvpress's pipeline tokenises a question
QUESTION = "\n\nWhat is the special magic number for {key}? The special magic number for {key} is:"


# ----------------------------------------------------------------------------------------- pure logic
def split_prompt(tok, prompt_ids):
    """``(context_ids, question_ids, key)`` of a needle prompt: the question is ``QUESTION`` for the one key of
    ``retrokv.harness.eval._WORDS`` whose separately tokenised question ends the prompt; the context is the
    rest. ``context_ids + question_ids == prompt_ids`` (raises if no key, or more than one, matches)."""
    from retrokv.harness.eval import _WORDS

    ids = [int(x) for x in prompt_ids]
    hits = []
    for w in _WORDS:
        q = tok(QUESTION.format(key=w), add_special_tokens=False)["input_ids"]
        if len(q) < len(ids) and ids[-len(q):] == list(q):
            hits.append((w, list(q)))
    if len(hits) != 1:
        raise ValueError(f"expected exactly one needle question at the end of the prompt, found {len(hits)}")
    key, q = hits[0]
    ctx = ids[:-len(q)]
    assert ctx + q == ids
    return ctx, q, key


def kept_tokens(n_ctx, ratio):
    """Context tokens a kvpress ScorerPress keeps per (layer, KV head) at compression ratio ``ratio``
    (``kvpress.utils.compute_n_kept``; ratio 0 keeps everything)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must lie in [0, 1), got {ratio!r}")
    return n_ctx if ratio == 0 else max(1, int(n_ctx * (1 - ratio)))


def density(n_ctx, n_q, ratio, steps):
    """Byte density of an eviction press: decode step j (1..``steps``) attends over the kept context, the
    ``n_q`` question tokens and the j answer tokens fed so far (all kept in full), out of the whole KV
    ``n_ctx + n_q + j``; averaged over the steps. Every layer and KV head keeps the same count and reads no
    metadata at decode time, so bytes read / bytes of the whole KV = tokens held / tokens of the whole KV
    (the unit of ``retrokv.harness.frontier.byte_density``)."""
    k = kept_tokens(n_ctx, ratio)
    return float(np.mean([(k + n_q + j) / (n_ctx + n_q + j) for j in range(1, steps + 1)]))


def ratio_for_density(target, n_ctx, n_q, steps):
    """The compression ratio (to 3 decimals) whose :func:`density` is closest to ``target``."""
    grid = np.round(np.arange(0, 1, 0.001), 3)
    return float(min(grid, key=lambda c: abs(density(n_ctx, n_q, float(c), steps) - target)))


def score_answer(nll, hit):
    """``retrokv.harness.frontier.forced_answer``'s rule on per-token (nll, argmax hit) of ``" " + answer``: the
    leading space is not scored; correct when every later token is the argmax; nll = their mean."""
    nll, hit = np.asarray(nll, float), np.asarray(hit, bool)
    return bool(hit[1:].all()), float(nll[1:].mean())


def ids_hash(ids):
    return hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- storage
def load_json(path=None):
    path = path or JSON
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"needle": {}, "runs": [], "checks": []}


def save_json(db, path=None):
    path = path or JSON
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(db, f, indent=0)
    os.replace(tmp, path)


def result_key(n, prompt, press, ratio):
    return f"{n}|{prompt}|{press}|{ratio:g}"


# ----------------------------------------------------------------------------------------- measurement (kvpress venv)
def _versions():
    from importlib.metadata import version

    return {p: version(p) for p in ("kvpress", "transformers", "torch", "tokenizers")}


def record_prefill(model, context_ids):
    """Dense prefill of ``context_ids`` (as kvpress's pipeline: ``model.model(input_ids, past_key_values)``),
    recording per attention layer what a press's ``forward_hook`` receives. Returns ``(records, cache)``:
    ``records[l] = (module, input, kwargs, output)`` (output's attention output dropped: hooks read ``output[1]``)."""
    import torch
    from transformers import DynamicCache

    records = {}

    def hook(module, inp, kwargs, output):
        kw = {k: v for k, v in kwargs.items() if k != "past_key_values"}
        records[module.layer_idx] = (module, inp, kw, (None,) + tuple(output[1:]))
        return output

    layers = model.model.layers
    hooks = [ly.self_attn.register_forward_hook(hook, with_kwargs=True) for ly in layers]
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
    finally:
        for h in hooks:
            h.remove()
    return [records[i] for i in range(len(layers))], cache


def press_cache(model, press, records, dense):
    """A new DynamicCache holding ``press``'s compression of each layer of the dense prefill cache ``dense``:
    the press's own ``forward_hook`` on each recorded layer call (``press`` None: the dense cache, copied)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, layer in enumerate(dense.layers):
        cache.update(layer.keys, layer.values, i)
    if press is None:
        return cache
    with torch.no_grad(), press(model):            # sets module.rotary_emb, post_init_from_model, as kvpress does
        for module, inp, kw, out in records:
            press.forward_hook(module, inp, dict(kw, past_key_values=cache), out)
    return cache


def hook_cache(model, press, context_ids):
    """kvpress's own mechanism, for ``check``: ``with press(model): model.model(context, past_key_values=cache)``."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
    return cache


def forced_through(model, tok, cache, n_ctx, question_ids, answer):
    """Feed the question through ``cache`` at positions ``n_ctx..`` (as kvpress's pipeline does: explicit
    position ids, since the compressed cache is shorter than the context), then ``" " + answer`` one token per
    decode step under teacher forcing. Returns ``(correct, answer_nll, density measured, steps, held)``: the
    density is the tokens each layer's cache holds at each decode step over ``n_ctx + n_q + j``."""
    import torch

    n_q = len(question_ids)
    ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([question_ids]), past_key_values=cache,
                    position_ids=torch.arange(n_ctx, n_ctx + n_q)[None], logits_to_keep=1)
        logits, pos, nll, hit, dens, held = out.logits[0, -1], n_ctx + n_q, [], [], [], []
        for i, t in enumerate(ids):
            lp = torch.log_softmax(logits.float(), -1)
            nll.append(float(-lp[int(t)]))
            hit.append(int(lp.argmax()) == int(t))
            if i + 1 < len(ids):
                out = model(input_ids=torch.tensor([[int(t)]]), past_key_values=cache,
                            position_ids=torch.tensor([[pos]]))
                pos += 1
                j = i + 1
                lens = [int(ly.keys.shape[2]) for ly in cache.layers]
                held.append(lens)
                dens.append(float(np.mean([x / (n_ctx + n_q + j) for x in lens])))
                logits = out.logits[0, -1]
    ok, mean_nll = score_answer(nll, hit)
    return ok, mean_nll, float(np.mean(dens)), len(ids) - 1, held


def _setup_torch():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("KVPRESS_THREADS", "1")))


def _make_press(name, ratio):
    import kvpress

    return getattr(kvpress, PRESSES[name])(compression_ratio=ratio)


def prompts_path(n):
    return os.path.join(PROMPTS_DIR, f"kvpress_prompts_{n}.json")


def write_prompts(args):
    """Main .venv: ``frontier_tasks.needle_prompts(tok, count, n)`` -> benchmarks/out/kvpress_prompts_<n>.json
    (token ids, task, depth, answer per prompt, the corpora's fingerprints), for ``run`` in the kvpress venv."""
    from frontier_tasks import needle_prompts

    from retrokv.harness.data import CORPORA, corpus_fingerprint
    from retrokv.harness.models import load_smollm2

    _, tok = load_smollm2()
    out = {"n_tokens": args.n, "fingerprints": {c: corpus_fingerprint(c) for c in CORPORA}, "versions": {},
           "prompts": [{"prompt": i, "task": s.task, "depth": s.depth, "answer": s.answer,
                        "ids": [int(x) for x in s.prompt_ids], "sha": ids_hash(s.prompt_ids)}
                       for i, s in needle_prompts(tok, args.prompts, args.n)]}
    from importlib.metadata import version

    out["versions"] = {p: version(p) for p in ("transformers", "tokenizers", "torch")}
    os.makedirs(PROMPTS_DIR, exist_ok=True)
    with open(prompts_path(args.n), "w") as f:
        json.dump(out, f)
    print(f"wrote {len(out['prompts'])} prompts of {args.n} tokens to {prompts_path(args.n)} "
          f"(corpus fingerprints {out['fingerprints']})")


def load_prompts(n, count):
    """The first ``count`` prompts written by ``write_prompts`` (raises when the file has fewer)."""
    import types

    path = prompts_path(n)
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: run `.venv/bin/python benchmarks/kvpress_needle.py prompts --n {n} "
                         f"--prompts {count}` in the main .venv first (make bench-kvpress does)")
    with open(path) as f:
        d = json.load(f)
    ps = d["prompts"][:count]
    if len(ps) < count:
        raise SystemExit(f"{path} holds {len(d['prompts'])} prompts, asked for {count}: rerun the prompts stage")
    out = []
    for p in ps:
        if ids_hash(p["ids"]) != p["sha"] or len(p["ids"]) != n:
            raise ValueError(f"prompt {p['prompt']} of {path}: ids do not match their hash or length {n}")
        out.append((p["prompt"], types.SimpleNamespace(task=p["task"], depth=p["depth"], answer=p["answer"],
                                                       prompt_ids=tuple(p["ids"]))))
    return out, d


def run(args):
    _setup_torch()
    from machine import describe

    from retrokv.harness.models import load_smollm2

    samples, meta = load_prompts(args.n, args.prompts)
    db = load_json(args.out)
    run_rec = {"argv": sys.argv[1:], "start": time.strftime("%Y-%m-%d %H:%M:%S"), "load": os.getloadavg()[0],
               "machine": describe(), "versions": _versions(), "prompts_built_with": meta["versions"],
               "fingerprints": meta["fingerprints"]}
    db["runs"].append(run_rec)
    save_json(db, args.out)
    presses = args.presses.split(",")
    ratios = [float(x) for x in args.ratios.split(",")]
    points = [("full", 0.0)] + [(p, r) for p in presses for r in ratios]
    model, tok = load_smollm2()
    for i, s in samples:
        todo = [(p, r) for p, r in points if result_key(args.n, i, p, r) not in db["needle"]]
        if not todo:
            continue
        ctx, q, key = split_prompt(tok, s.prompt_ids)
        t0 = time.time()
        records, dense = record_prefill(model, ctx)
        print(f"prompt {i} ({s.task}, depth {s.depth:.2f}, context {len(ctx)} + question {len(q)}): "
              f"prefill {time.time() - t0:.0f}s load={os.getloadavg()[0]:.1f}", flush=True)
        for p, r in todo:
            t1 = time.time()
            cache = press_cache(model, None if p == "full" else _make_press(p, r), records, dense)
            ok, nll, dens, steps, held = forced_through(model, tok, cache, len(ctx), q, s.answer)
            want = density(len(ctx), len(q), r, steps)
            assert abs(dens - want) < 1e-9, (p, r, dens, want)   # every layer holds exactly what density() says
            db["needle"][result_key(args.n, i, p, r)] = {
                "n_tokens": args.n, "prompt": i, "task": s.task, "depth": s.depth, "press": p, "ratio": r,
                "answer": s.answer, "key": key, "correct": bool(ok), "answer_nll": nll, "density": dens,
                "kept_context": kept_tokens(len(ctx), r), "n_context": len(ctx), "n_question": len(q),
                "steps": steps, "prompt_sha": ids_hash(s.prompt_ids)}
            save_json(db, args.out)
            print(f"    {p} ratio={r:g}: {'OK ' if ok else 'no '} density={dens:.3f} nll={nll:.3f} "
                  f"{time.time() - t1:.0f}s", flush=True)
            del cache
        del records, dense
    run_rec.update(end=time.strftime("%Y-%m-%d %H:%M:%S"), load_end=os.getloadavg()[0])
    save_json(db, args.out)


def check(args):
    """Shared-prefill compression == kvpress's own hooks around the prefill, per press and ratio, on prompt 0."""
    _setup_torch()
    import torch
    from frontier_tasks import needle_prompts

    from retrokv.harness.models import load_smollm2

    db = load_json(args.out)
    done = {(c["n_tokens"], c["press"], c["ratio"]) for c in db.get("checks", [])}
    todo = [(p, float(r)) for p in args.presses.split(",") for r in args.ratios.split(",")
            if (args.n, p, float(r)) not in done]
    if not todo:
        print(f"check at {args.n} tokens: every (press, ratio) already checked")
        return
    model, tok = load_smollm2()
    (i, s), = needle_prompts(tok, 1, args.n)
    ctx, q, _ = split_prompt(tok, s.prompt_ids)
    records, dense = record_prefill(model, ctx)
    for p, r in todo:
        a = press_cache(model, _make_press(p, r), records, dense)
        b = hook_cache(model, _make_press(p, r), ctx)
        same = all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))
        held = sorted({int(x.keys.shape[2]) for x in a.layers})
        db["checks"].append({"n_tokens": args.n, "prompt": i, "press": p, "ratio": r, "identical": bool(same),
                             "held": held, "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        save_json(db, args.out)
        print(f"{p} ratio={r:g}: caches {'IDENTICAL' if same else 'DIFFER'} (held {held})", flush=True)


def merge(args):
    """Add the results, checks and runs of other results files (runs made concurrently with ``--out``)."""
    db = load_json(args.out)
    for path in args.paths:
        other = load_json(path)
        db["needle"].update(other.get("needle", {}))
        have = {(c["n_tokens"], c["press"], c["ratio"]) for c in db.setdefault("checks", [])}
        db["checks"] += [c for c in other.get("checks", []) if (c["n_tokens"], c["press"], c["ratio"]) not in have]
        db["runs"] += [dict(r, merged_from=path) for r in other.get("runs", [])]
        print(f"merged {len(other.get('needle', {}))} results, {len(other.get('checks', []))} checks from {path}")
    save_json(db, args.out)


# ----------------------------------------------------------------------------------------- report (main venv)
def press_rows(results, full_key="full"):
    """Per (press, ratio) of kvpress results: prompts, mean density, accuracy, full accuracy on the SAME prompts
    (nan where full is missing for one of them), delta in points, mean answer nll, mean kept-context fraction."""
    full = {r["prompt"]: r for r in results if r["press"] == full_key}
    acc = {}
    for r in results:
        acc.setdefault((r["press"], r["ratio"]), []).append(r)
    out = []
    for (p, ratio), rs in acc.items():
        ps = [r["prompt"] for r in rs]
        fa = float(np.mean([full[x]["correct"] for x in ps])) if all(x in full for x in ps) else float("nan")
        a = float(np.mean([r["correct"] for r in rs]))
        out.append({"press": p, "ratio": ratio, "prompts": len(rs), "prompt_ids": sorted(ps),
                    "density": float(np.mean([r["density"] for r in rs])),
                    "kept": float(np.mean([r["kept_context"] / r["n_context"] for r in rs])),
                    "accuracy": a, "full_accuracy": fa, "delta_points": 100 * (a - fa),
                    "answer_nll": float(np.mean([r["answer_nll"] for r in rs]))})
    order = ["full"] + list(PRESSES)
    return sorted(out, key=lambda r: (order.index(r["press"]) if r["press"] in order else 99, r["density"]))


def full_agreement(kv, rk):
    """Per prompt measured with full attention by both: kvpress-venv full vs retrokv full (correct, nll)."""
    a = {r["prompt"]: r for r in kv if r["press"] == "full"}
    b = {r["prompt"]: r for r in rk if r["method"] == "full"}
    return [{"prompt": p, "task": a[p]["task"], "kvpress venv correct": a[p]["correct"],
             "retrokv correct": b[p]["correct"], "kvpress venv nll": a[p]["answer_nll"],
             "retrokv nll": b[p]["answer_nll"], "same": a[p]["correct"] == b[p]["correct"]}
            for p in sorted(set(a) & set(b))]


def side_by_side(kv, rk, max_factor=1.25):
    """For each retrokv needle point (not full), each press at its nearest density, both on the intersection of
    the prompts each measured. Returns rows: retrokv method, knob, density, accuracy, nll, n; per press the
    (ratio, density, accuracy, nll, n) on the same prompts."""
    rk_by = {}
    for r in rk:
        if r["method"] != "full":
            rk_by.setdefault((r["method"], r["knob"]), []).append(r)
    kv_by = {}
    for r in kv:
        if r["press"] != "full":
            kv_by.setdefault((r["press"], r["ratio"]), []).append(r)
    out = []
    for (m, knob), rs in rk_by.items():
        bd = float(np.mean([r["byte_density"] for r in rs]))
        row = {"method": m, "knob": knob, "byte_density": bd, "cells": {}}
        for p in PRESSES:
            cands = [(k, v) for k, v in kv_by.items() if k[0] == p]
            if not cands:
                continue
            (_, ratio), vs = min(cands, key=lambda kv_: abs(np.mean([x["density"] for x in kv_[1]]) - bd))
            if abs(np.log(np.mean([v["density"] for v in vs]) / bd)) > np.log(max_factor):
                continue                      # no press point near this density
            common = sorted({r["prompt"] for r in rs} & {v["prompt"] for v in vs})
            if not common:
                continue
            a = [r for r in rs if r["prompt"] in common]
            b = [v for v in vs if v["prompt"] in common]
            row["cells"][p] = {"ratio": ratio, "density": float(np.mean([v["density"] for v in b])),
                               "accuracy": float(np.mean([v["correct"] for v in b])),
                               "answer_nll": float(np.mean([v["answer_nll"] for v in b])), "n": len(common),
                               "retrokv_accuracy": float(np.mean([r["correct"] for r in a])),
                               "retrokv_nll": float(np.mean([r["answer_nll"] for r in a]))}
        if row["cells"]:
            out.append(row)
    order = ("wave", "wave_noest", "graph", "ivf", "quest", "streaming", "topk")
    return sorted(out, key=lambda r: (order.index(r["method"]) if r["method"] in order else 99, r["byte_density"]))


def _commands(db):
    """The command lines of the stored runs and checks, in order (a run made with ``--out`` elsewhere is listed
    with the ``merge`` that added it)."""
    cmds = []
    exe = "`.venv-kvpress/bin/python benchmarks/kvpress_needle.py "
    for r in db.get("runs", []):
        c = [exe + " ".join(r.get("argv", [])) + "`"]
        if r.get("merged_from"):
            c.append(f"`.venv/bin/python benchmarks/kvpress_needle.py merge {r['merged_from']}`")
        cmds += [x for x in c if x not in cmds]
    by_n = {}
    for c in db.get("checks", []):
        by_n.setdefault(c["n_tokens"], (set(), set()))
        by_n[c["n_tokens"]][0].add(c["press"])
        by_n[c["n_tokens"]][1].add(c["ratio"])
    for n, (ps, rs) in sorted(by_n.items()):
        full = ps == set(PRESSES) and rs == set(RATIOS)
        cmds.append(exe + f"check --n {n}" + ("" if full else f" --presses {','.join(p for p in PRESSES if p in ps)} "
                                                              f"--ratios {','.join(f'{r:g}' for r in sorted(rs))}") + "`")
    return "; ".join(cmds)


def report_md(db, rk_db, machine=None, n=N):
    from retrokv.harness.eval import markdown_table

    kv = [r for r in db["needle"].values() if r.get("n_tokens", n) == n]
    other = [r for r in db["needle"].values() if r.get("n_tokens", n) != n]
    rk = [r for r in rk_db.get("needle", {}).values() if r.get("n_tokens", n) == n]
    rows = press_rows(kv)
    runs = db.get("runs", [])
    vers = runs[-1].get("versions", {}) if runs else {}
    loads = [r[k] for r in runs for k in ("load", "load_end") if r.get(k) is not None]
    spans = "; ".join(f"`{' '.join(r.get('argv', []))}` {r.get('start', '?')} to {r.get('end', '(stopped)')}"
                      for r in runs)
    n_full = sorted({r["prompt"] for r in kv if r["press"] == "full"})
    lines = ["# kvpress side by side: needle accuracy against byte density (SmolLM2-135M, 8192 tokens)", "",
             "Commands: `.venv/bin/python benchmarks/kvpress_needle.py prompts --prompts 20` and `prompts --n 1024 "
             f"--prompts 8` (main venv), then {_commands(db)}, then `.venv/bin/python benchmarks/kvpress_needle.py "
             "report` (`make bench-kvpress` runs all of these but the 8192-token check, without --out)  ",
             f"Machine: {machine or (runs[-1].get('machine') if runs else '?')}  ",
             "Versions (kvpress venv, `benchmarks/requirements-kvpress.txt`): "
             + ", ".join(f"{k} {v}" for k, v in vers.items()) + "  ",
             f"Runs: {spans}" + (f"; 1-minute load average {min(loads):.1f}-{max(loads):.1f} at the runs' starts and "
                                 "ends (2 cores shared with other jobs: timings are not reported)." if loads else "")
             + "  ", "",
             f"**Prompts.** {len(n_full)} prompts (indices {', '.join(map(str, n_full))}), the SAME token ids as "
             "`benchmarks/frontier_tasks.py needle` (its `needle_prompts`; prompt i is RULER-style NIAH / 4-key "
             "multi-key on a natural-text haystack, see frontier_needle.md), built in the main .venv by the `prompts` stage "
             "and read by the kvpress venv: the `licenses` haystack is the licence texts of the installed "
             "distributions, which differ between the two venvs (corpus fingerprints "
             + (", ".join(f"{k} {v}" for k, v in (runs[-1].get("fingerprints") or {}).items()) if runs else "?")
             + "). "
             "Each prompt is split as kvpress's "
             "pipeline splits its input: **context** = instructions + haystack with the needle(s), **question** = "
             "`\"\\n\\nWhat is the special magic number for K? The special magic number for K is:\"` tokenised on its "
             "own (asserted to be exactly the last tokens of the prompt, so context + question = the prompt retrokv "
             "scores). No BOS and no chat template (retrokv's prompts have neither).", "",
             "**What kvpress does.** The press is active during the context prefill only and evicts, per layer and "
             "KV head, all but `int(n_context * (1 - ratio))` context tokens; the question is then fed through the "
             "compressed cache at positions n_context.. (explicit position ids, as `KVPressTextGenerationPipeline` "
             "does), then `\" \" + answer` one decode step per token: **eviction is decided before the question is "
             "seen** (SnapKV's observation window is the last 64 context tokens, not the question). retrokv's "
             "methods keep the whole KV and choose what to read at every decode step, after the question. Presses "
             "with their kvpress defaults (StreamingLLM: 4 sinks; SnapKV: window 64, kernel 5; ExpectedAttention: "
             "512 future positions, covariance, value norms, 4 sinks; KNorm). One dense context prefill per prompt; "
             "each (press, ratio) is the press's own `forward_hook` applied to every layer's recorded call "
             "(bit-identical to `with press(model): model.model(context)`, see the check below).", "",
             "**Scoring**: exactly `retrokv.harness.frontier.forced_answer`: correct when each of the 7 answer digits "
             "is the argmax given the right prefix; `answer nll`: mean NLL of the 7 digits. The leading space is "
             "predicted after the question and not scored.", "",
             "**Density** (the x axis of frontier_needle.md, bytes read per decode step / bytes of the whole KV): at "
             "decode step j = 1..7 every layer holds `kept + n_question + j` tokens (kept context, the question and "
             "the answer tokens so far, all in full) of the whole `n_context + n_question + j`; a press reads no "
             "metadata at decode time and keeps the same count in every layer and head, so byte density = this "
             "token fraction, averaged over the 7 steps (measured from the cache at every step and asserted equal "
             "to `density()` in the script). With n_context ~ 8173 and n_question ~ 19, density ~ "
             "(1 - ratio) + 0.003. The scoring cost of a press (done once, in the prefill) is not counted, as "
             "retrokv's index build is not.", "",
             "`full acc (same prompts)`: full attention (no press) in the kvpress venv on the prompts that point was "
             "measured on; `delta`: accuracy minus that, in points.", "",
             markdown_table([{"press": r["press"], "ratio": f"{r['ratio']:g}", "prompts": r["prompts"],
                              "density": r["density"], "kept context": r["kept"], "accuracy": r["accuracy"],
                              "full acc (same prompts)": r["full_accuracy"],
                              "delta (points)": f"{r['delta_points']:+.0f}", "answer nll": r["answer_nll"]}
                             for r in rows],
                            ["press", "ratio", "prompts", "density", "kept context", "accuracy",
                             "full acc (same prompts)", "delta (points)", "answer nll"]), ""]
    tasks = sorted({r["task"] for r in kv})
    per = []
    for r in rows:
        row = {"press": r["press"], "ratio": f"{r['ratio']:g}"}
        for t in tasks:
            xs = [x["correct"] for x in kv if x["press"] == r["press"] and x["ratio"] == r["ratio"] and x["task"] == t]
            row[t] = f"{sum(xs)}/{len(xs)}" if xs else ""
        per.append(row)
    lines += ["Correct prompts per task:", "", markdown_table(per, ["press", "ratio"] + tasks), ""]
    agree = full_agreement(kv, rk)
    n_same = sum(a["same"] for a in agree)
    lines += ["## Sanity check: full attention in the kvpress venv vs retrokv's full rows", "",
              f"transformers {vers.get('transformers', '?')} + HF SDPA (context prefill, then question) against "
              "retrokv's full rows in `frontier_needle.json` (transformers of the main venv, one dense prefill of "
              f"the whole prompt, retrokv's dense decode): **{n_same} of {len(agree)} prompts agree** on "
              "correct/incorrect" + ("." if n_same == len(agree) else " (MISMATCH: see the table).") + "", "",
              markdown_table([{k: (("yes" if v else "no") if isinstance(v, bool) else v) for k, v in a.items()}
                              for a in agree],
                             ["prompt", "task", "kvpress venv correct", "retrokv correct", "kvpress venv nll",
                              "retrokv nll", "same"]) if agree else "(no prompt measured by both)", ""]
    for m in sorted({r["n_tokens"] for r in other}):
        orows = press_rows([r for r in other if r["n_tokens"] == m])
        lines += [f"## Sanity: lower compression ratios at {m} tokens", "",
                  f"The same pipeline on the first {len({r['prompt'] for r in other if r['n_tokens'] == m})} prompts "
                  f"built at {m} tokens (`prompts --n {m}`, `run --n {m} --ratios ...`), at lower compression ratios, "
                  "where the prefill is cheap: accuracy against the kept fraction. A check on the plumbing: "
                  "StreamingLLM (4 sinks + the most recent context) answers exactly the prompts that full attention "
                  "answers AND whose needle lies inside its window (at 1024 tokens and ratio 0.1 it loses only the "
                  "two prompts with the needle at depth 0.05); what decides the other presses is which tokens their "
                  "scores kept.", "",
                  markdown_table([{"press": r["press"], "ratio": f"{r['ratio']:g}", "prompts": r["prompts"],
                                   "density": r["density"], "accuracy": r["accuracy"],
                                   "full acc (same prompts)": r["full_accuracy"],
                                   "delta (points)": f"{r['delta_points']:+.0f}", "answer nll": r["answer_nll"]}
                                  for r in orows],
                                 ["press", "ratio", "prompts", "density", "accuracy", "full acc (same prompts)",
                                  "delta (points)", "answer nll"]), ""]
    checks = db.get("checks", [])
    if checks:
        ok = sum(c["identical"] for c in checks)
        lines += ["## Check: one shared prefill = kvpress's own hooks", "",
                  f"`.venv-kvpress/bin/python benchmarks/kvpress_needle.py check` on prompt 0 at "
                  f"{', '.join(str(n) for n in sorted({c['n_tokens'] for c in checks}))} tokens: the cache built by "
                  "applying each press's `forward_hook` to the recorded layer calls of one dense prefill equals, "
                  "bit for bit (`torch.equal` on every layer's keys and values), the cache of `with press(model): "
                  f"model.model(context_ids, past_key_values=cache)` in **{ok} of {len(checks)}** (press, ratio) "
                  "cases: " + ", ".join(f"{c['press']}@{c['ratio']:g}/{c['n_tokens']}"
                                         + ("" if c["identical"] else " DIFFER") for c in checks) + ".", ""]
    sbs = side_by_side(kv, rk)
    common = common_prompts(kv, rk)
    rk_full = {r["prompt"]: r["correct"] for r in rk if r["method"] == "full"}
    kv_full = {r["prompt"]: r["correct"] for r in kv if r["press"] == "full"}
    if sbs:
        tab = []
        for r in sbs:
            row = {"retrokv point": f"{r['method']} {r['knob']}", "byte density": r["byte_density"]}
            ns = {c["n"] for c in r["cells"].values()}
            first = next(iter(r["cells"].values()), None)
            row["retrokv acc (nll)"] = (f"{first['retrokv_accuracy']:.2f} ({first['retrokv_nll']:.2f})"
                                        if first and len(ns) == 1 else "")
            for p, c in r["cells"].items():
                row[p] = f"{c['accuracy']:.2f} ({c['answer_nll']:.2f}) @ {c['density']:.3f}"
            row["prompts"] = "/".join(str(n) for n in sorted(ns))
            tab.append(row)
        lines += ["## Side by side with retrokv (same prompts, nearest density)", "",
                  "Each retrokv needle point of `benchmarks/results/frontier_needle.json` (byte density as there) "
                  "against each press at the ratio whose density is nearest, both on the intersection of the prompt "
                  "indices each measured (`prompts`: how many), for retrokv points with a press point within a "
                  "factor 1.25 in density. Cells: accuracy (mean answer nll) @ density. Full attention on the "
                  f"{len(common)} prompts both measured: retrokv {sum(rk_full[p] for p in common)}/{len(common)}, "
                  f"kvpress venv {sum(kv_full[p] for p in common)}/{len(common)} correct.", "",
                  markdown_table(tab, ["retrokv point", "byte density", "prompts", "retrokv acc (nll)"]
                                 + [p for p in PRESSES if any(p in r["cells"] for r in sbs)]), ""]
    return "\n".join(lines), rows


def common_prompts(kv, rk):
    """Prompt indices measured with full attention by both kvpress (its venv) and retrokv."""
    return sorted({r["prompt"] for r in kv if r["press"] == "full"} & {r["prompt"] for r in rk if r["method"] == "full"})


def plot(kv, rk, path):
    """Accuracy and answer nll against density (log x) of every press and retrokv method, all on the prompts
    both measured with full attention (``common_prompts``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from retrokv.harness.frontier import COLORS, LABELS, needle_rows

    common = set(common_prompts(kv, rk))
    rows = press_rows([r for r in kv if r["prompt"] in common])
    rk_rows = needle_rows([r for r in rk if r["prompt"] in common])
    kv_colors = {"streaming_llm": "tab:brown", "snapkv": "tab:olive", "expected_attention": "tab:pink",
                 "knorm": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key in zip(axes, ("accuracy", "answer_nll")):
        for p in PRESSES:
            sel = sorted((r for r in rows if r["press"] == p), key=lambda r: r["density"])
            if sel:
                ax.plot([r["density"] for r in sel], [r[key] for r in sel], "s--", ms=4, color=kv_colors[p],
                        label=f"kvpress {PRESSES[p]} [{min(r['prompts'] for r in sel)}+ prompts]")
        known = ("wave", "wave_noest", "graph", "streaming", "topk", "quest", "ivf")
        methods = [m for m in known if any(r["method"] == m for r in rk_rows)]
        methods += sorted({r["method"] for r in rk_rows} - set(known) - {"full"})   # any method added later
        for m in methods:
            sel = sorted((r for r in rk_rows if r["method"] == m), key=lambda r: r["byte_density"])
            ax.plot([r["byte_density"] for r in sel], [r[key] for r in sel], "o-", ms=4, color=COLORS.get(m),
                    label=f"retrokv {LABELS.get(m, m)} [{min(r['prompts'] for r in sel)}+ prompts]")
        for full, lab, mk in ([r for r in rk_rows if r["method"] == "full"], "retrokv full attention", "*"), \
                ([r for r in rows if r["press"] == "full"], "full attention, kvpress venv", "x"):
            if full:
                ax.plot([1.0], [full[0][key]], mk, ms=10 if mk == "*" else 8, color="tab:red",
                        label=f"{lab} [{full[0]['prompts']} prompts]")
        ax.set_xscale("log")
        ax.set_xlim(0.04, 1.3)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:g}" if x in (0.05, 0.1, 0.2, 0.3, 0.5) else ""))
        ax.axvline(0.10, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("byte density (bytes read per decode step / whole KV)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("needle accuracy (teacher-forced, 7 digits)")
    axes[1].set_ylabel("mean NLL of the answer digits")
    axes[0].set_ylim(-0.03, 1.03)
    axes[1].set_yscale("log")
    axes[1].yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes[1].yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    axes[0].legend(fontsize=6.5, loc="upper left")
    fig.suptitle(f"kvpress eviction (decided before the question) vs retrokv retrieval (every decode step): "
                 f"SmolLM2-135M, 8192 tokens, the {len(common)} prompts both measured", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args):
    db = load_json(args.out)
    with open(args.retrokv) as f:
        rk_db = json.load(f)
    md, _ = report_md(db, rk_db)
    out_md = os.path.splitext(args.out or JSON)[0] + ".md"
    with open(out_md, "w") as f:
        f.write(md)
    img = args.img or os.path.join(ROOT, "docs", "img", "frontier_kvpress.png")
    plot([r for r in db["needle"].values() if r["n_tokens"] == N],
         [r for r in rk_db["needle"].values() if r["n_tokens"] == N], img)
    print(md)
    print(f"wrote {out_md} and {img}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("prompts", "run", "check", "report", "merge"))
    ap.add_argument("paths", nargs="*", help="merge: results json files of runs made elsewhere (--out) to add")
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--presses", default=",".join(PRESSES))
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    ap.add_argument("--out", default=None, help="results json (default benchmarks/results/frontier_kvpress.json)")
    ap.add_argument("--retrokv", default=RETROKV_JSON, help="retrokv's needle results to compare with")
    ap.add_argument("--img", default=None)
    a = ap.parse_args()
    {"prompts": write_prompts, "run": run, "check": check, "report": report, "merge": merge}[a.stage](a)
