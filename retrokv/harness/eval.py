"""Evaluation harness: RULER-style synthetic retrieval tasks, perplexity and per-layer attention error.

Everything is generated in code, so anyone can rerun it offline:

* **passkey** (Mohtashami & Jaggi 2023, as used by RetrievalAttention §4 and RetroInfer §5): a five-digit
  key hidden at a chosen depth in repeated filler sentences;
* **needle** (RULER's NIAH, Hsieh et al. 2024): one or several ``key -> 7-digit number`` needles in a
  filler (``haystack="noise"``) or natural-text (``haystack="natural"``) haystack, asking for one key;
* **perplexity** of natural text under teacher forcing, the method active for *every* predicted token
  (the context is prefilled densely, then each next token goes through the method's decode path);
* **layer_errors**: per layer, the relative error ``||o - o_hat|| / ||o||`` of the method's decode
  attention against full attention on captured real Q/K/V, its density and recall@100.

``retrokv eval`` (:mod:`retrokv.harness.cli`) drives these and writes a markdown table and plots.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

TASKS = ("passkey", "needle", "multikey", "needle_natural")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_HEAD = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")


@dataclass(frozen=True)
class Sample:
    """One synthetic prompt: token ids, the expected answer string, and where the needle sits."""

    task: str
    n_tokens: int
    depth: float
    prompt_ids: tuple
    answer: str


def _check_common(n_tokens, depth):
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 128:
        raise ValueError(f"n_tokens must be an int >= 128 (room for the needle and question), got {n_tokens!r}")
    if not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth!r}")


def _haystack(tok, n, kind, rng):
    """``n`` token ids of filler sentences or built-in natural text (from a random offset)."""
    if kind == "noise":
        unit = tok(FILLER, add_special_tokens=False)["input_ids"]
        return (unit * (n // len(unit) + 1))[:n]
    from .data import natural_text_ids

    ids = natural_text_ids(tok, 2 * n + 4096)
    start = int(rng.integers(0, len(ids) - n))
    return ids[start:start + n]


def _assemble(tok, task, n_tokens, depth, needles, question, answer, kind, rng):
    head = tok(_HEAD, add_special_tokens=False)["input_ids"]
    q = tok("\n\n" + question, add_special_tokens=False)["input_ids"]
    needle_ids = [tok(" " + s + " ", add_special_tokens=False)["input_ids"] for s in needles]
    room = n_tokens - len(head) - len(q) - sum(map(len, needle_ids))
    if room < 16:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for a haystack")
    hay = _haystack(tok, room, kind, rng)
    # the asked-for needle goes at `depth`; distractor needles at random depths
    at = [int(depth * room)] + [int(rng.integers(0, room)) for _ in needles[1:]]
    order = sorted(range(len(needles)), key=lambda i: at[i])
    ids, prev = list(head), 0
    for i in order:
        ids += hay[prev:at[i]] + needle_ids[i]
        prev = at[i]
    ids += hay[prev:] + q
    return Sample(task, n_tokens, float(depth), tuple(ids), answer)


def passkey(tok, n_tokens, depth, seed=0):
    """A passkey prompt of ``n_tokens`` tokens with the key at relative ``depth`` (0 = start)."""
    _check_common(n_tokens, depth)
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10_000, 100_000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _assemble(tok, "passkey", n_tokens, depth, [needle], "What is the pass key? The pass key is",
                     key, "noise", rng)


_WORDS = ("apple", "river", "candle", "falcon", "marble", "violet", "harbor", "pepper", "silver", "thunder",
          "meadow", "lantern", "copper", "orchid", "glacier", "saddle", "walnut", "ember", "quartz", "tulip")


def needle(tok, n_tokens, depth, n_keys=1, haystack="noise", seed=0):
    """RULER-style NIAH: ``n_keys`` needles ``key -> 7-digit number``; the question asks for the first,
    placed at ``depth``; the others are distractors at random depths."""
    _check_common(n_tokens, depth)
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or not 1 <= n_keys <= len(_WORDS):
        raise ValueError(f"n_keys must be an int in [1, {len(_WORDS)}], got {n_keys!r}")
    if haystack not in ("noise", "natural"):
        raise ValueError(f"haystack must be 'noise' or 'natural', got {haystack!r}")
    rng = np.random.default_rng(seed)
    keys = list(rng.choice(_WORDS, size=n_keys, replace=False))
    values = [str(int(rng.integers(1_000_000, 10_000_000))) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    question = f"What is the special magic number for {keys[0]}? The special magic number for {keys[0]} is:"
    task = "needle" if n_keys == 1 and haystack == "noise" else ("multikey" if haystack == "noise" else "needle_natural")
    return _assemble(tok, task, n_tokens, depth, needles, question, values[0], haystack, rng)


def make_samples(tok, task, lengths, samples, seed=0, depths=None):
    """``samples`` prompts per length, the needle depths evenly spaced over ``[0.05, 0.95]``, or
    ``samples`` prompts at each of the given ``depths``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if depths is None:
        depths = np.linspace(0.05, 0.95, samples)
    else:
        if not len(depths) or not all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in depths):
            raise ValueError(f"depths must be fractions in [0, 1], got {depths!r}")
        depths = np.repeat(np.asarray(depths, float), samples)
    out = []
    for n in lengths:
        for i, dep in enumerate(depths):
            s = seed + 1000 * i + n
            if task == "passkey":
                out.append(passkey(tok, n, float(dep), s))
            elif task == "needle":
                out.append(needle(tok, n, float(dep), 1, "noise", s))
            elif task == "multikey":
                out.append(needle(tok, n, float(dep), 4, "noise", s))
            else:
                out.append(needle(tok, n, float(dep), 1, "natural", s))
    return out


# ---------------------------------------------------------------------------------------------- methods
def method_config(method, n_tokens):
    """The config each method runs with at ``n_tokens`` of context: :func:`retrokv.methods.default_config`
    (``None`` for ``"plain"``, the untouched model)."""
    from .. import methods

    return None if method == "plain" else methods.default_config(method, n_tokens)


def _forward(model, ids, cache):
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor([list(ids)]), cache=cache, use_cache=True)
    return out.logits[0, -1].float()


def shared_prefill(model, ids, backend=None):
    """Prefill ``ids`` once, densely, keeping every layer's Q/K/V so that each method can build its
    index from it (:meth:`retrokv.hf.Attached.rebuild`). Returns ``(last_logits, saved, seconds)``."""
    from .. import hf

    h = hf.attach(model, "full", backend=backend)
    h.keep_prefill = True
    try:
        t0 = time.perf_counter()
        logits = _forward(model, ids, hf.index_cache())
        secs = time.perf_counter() - t0
    finally:
        hf.detach(model)
    return logits, h.prefill, secs


class _Method:
    """``method`` attached and built from a shared prefill, with a cache that resumes after it."""

    def __init__(self, model, method, config, backend, saved, n, progress=False):
        self.model, self.method, self.config, self.backend = model, method, config, backend
        self.saved, self.n, self.progress = saved, n, progress

    def __enter__(self):
        import torch
        from transformers import DynamicCache

        from .. import hf

        t0 = time.perf_counter()
        if self.method == "plain":         # the untouched model with transformers' own cache
            self.handle = None
            self.cache = DynamicCache(ddp_cache_data=[(torch.from_numpy(k), torch.from_numpy(v))
                                                      for _, k, v, _ in (self.saved[i] for i in sorted(self.saved))])
        else:
            self.handle = hf.attach(self.model, self.method, self.config, self.backend)
            self.handle.rebuild(self.saved, progress=self.progress)
            self.cache = hf.index_cache(len(self.saved), self.n)
        self.build_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc):
        from .. import hf

        if self.handle is not None:
            hf.detach(self.model)


def _config(configs, method, n):
    if configs and method in configs:
        return configs[method]
    return method_config(method, n)


def _label_method(m):
    from .. import methods

    pair = (m, m) if isinstance(m, str) else m
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        raise TypeError(f"a method is a name or a (label, method) pair of strings, got {m!r}")
    if pair[1] not in methods.names() + ("plain",):
        raise ValueError(f"method must be one of {methods.names() + ('plain',)}, got {pair[1]!r}")
    return pair


def run_task(model, tok, samples, methods=("full",), configs=None, backend=None, max_new_tokens=10,
             progress=True):
    """Answer every sample with every method (one shared dense prefill per sample, greedy decode).

    Returns one dict per method: accuracy, mean density, decode tokens/s, mean index build seconds,
    mean prefill seconds and the answers. ``configs``: optional ``{method: config}``. A method may be
    given as ``(label, method)`` to compare several configs of one method on the same prefills; its
    config is then looked up under the label and its row is named by the label.
    """
    from tqdm.auto import tqdm

    pairs = [_label_method(m) for m in methods]
    if len({lab for lab, _ in pairs}) != len(pairs):
        raise ValueError(f"method labels must be distinct, got {[lab for lab, _ in pairs]}")
    acc = {lab: {"method": lab, "samples": len(samples), "correct": 0, "density": [], "steps": 0, "decode_s": 0.0,
                 "build_s": 0.0, "answers": []} for lab, _ in pairs}
    prefill_s = 0.0
    for s in tqdm(samples, desc="samples", disable=not progress, leave=False):
        # one bar per sample over its stages, named by the stage running now: where the time goes
        stages = tqdm(total=1 + 2 * len(pairs), desc=f"prefill {s.n_tokens} tokens", disable=not progress,
                      leave=False)
        logits0, saved, p = shared_prefill(model, s.prompt_ids, backend)
        prefill_s += p
        stages.update()
        for lab, m in pairs:
            r = acc[lab]
            cfg = configs[lab] if configs and lab in configs else _config(configs, m, s.n_tokens)
            stages.set_description(f"build {lab}")
            with _Method(model, m, cfg, backend, saved, len(s.prompt_ids), progress) as run:
                stages.update()
                stages.set_description(f"decode {lab}")
                new, t0 = [int(logits0.argmax())], time.perf_counter()
                while len(new) < max_new_tokens and new[-1] != tok.eos_token_id:
                    new.append(int(_forward(model, [new[-1]], run.cache).argmax()))
                r["decode_s"] += time.perf_counter() - t0
                r["steps"] += len(new) - 1
                r["build_s"] += run.build_s
                if run.handle is not None and run.handle.stats:
                    r["density"].append(run.handle.mean_density())
            stages.update()
            text = tok.decode(new, skip_special_tokens=True)
            r["answers"].append(text)
            r["correct"] += s.answer in text.replace(",", "")
        stages.close()
    out = []
    for lab, _ in pairs:
        r = acc[lab]
        out.append({"method": lab, "samples": len(samples), "accuracy": r["correct"] / max(1, len(samples)),
                    "density": float(np.mean(r["density"])) if r["density"] else 1.0,
                    "decode_tok_s": r["steps"] / r["decode_s"] if r["decode_s"] else float("nan"),
                    "build_s": r["build_s"] / max(1, len(samples)), "prefill_s": prefill_s / max(1, len(samples)),
                    "answers": r["answers"]})
    return out


def perplexity(model, ids, n_context, methods=("full",), configs=None, backend=None, progress=True,
               prefill=None):
    """Perplexity of ``ids[n_context:]`` given everything before, one token at a time through each method.

    The first ``n_context`` tokens are prefilled densely once (each method builds its index from
    that prefill); every later token is predicted by a decode step that attends through the method
    (the method is active for every predicted token). Returns ``{method: (ppl, nll per token)}``.
    ``prefill``: a :func:`shared_prefill` result for ``ids[:n_context]`` to reuse across calls.
    """
    import torch
    from tqdm.auto import tqdm

    ids = list(ids)
    if not 1 <= n_context < len(ids):
        raise ValueError(f"n_context must be in [1, {len(ids)}), got {n_context}")
    stages = tqdm(total=2 * len(methods) + (prefill is None), desc=f"ppl: prefill {n_context} tokens",
                  disable=not progress, leave=False)
    logits0, saved, _ = prefill if prefill is not None else shared_prefill(model, ids[:n_context], backend)
    stages.update(prefill is None)
    out = {}
    for m in methods:
        nll, logits = [], logits0
        stages.set_description(f"ppl: build {m}")
        with _Method(model, m, _config(configs, m, n_context), backend, saved, n_context, progress) as run:
            stages.update()
            stages.set_description(f"ppl: decode {m}")
            for t in tqdm(range(n_context, len(ids)), desc=f"ppl {m}", disable=not progress, leave=False):
                nll.append(float(-torch.log_softmax(logits, -1)[ids[t]]))
                if t + 1 < len(ids):
                    logits = _forward(model, [ids[t]], run.cache)
        stages.update()
        out[m] = (float(np.exp(np.mean(nll))), np.array(nll))
    stages.close()
    return out


def layer_errors(captured, method="wave", config=None, backend=None, n_queries=16, k_recall=100):
    """Per layer: relative decode-attention error, density and recall@``k_recall`` against full attention.

    ``captured``: ``{layer: LayerQKV}`` from :func:`retrokv.harness.models.capture_qkv`. The index is built on
    the keys before the last ``n_queries`` positions; each of those positions' queries then attends
    through it (the context grows by appending the keys in between, as in decoding).
    """
    from .. import methods
    from ..reference.attention import full_attention

    rows = []
    for layer, c in sorted(captured.items()):
        q, k, v = c.q, c.k, c.v
        n = k.shape[1]
        p = n - n_queries
        cfg = config if config is not None else method_config(method, n)
        index = methods.build(method, k[:, :p], v[:, :p], q[:, :p], config=cfg, backend=backend)
        errs, dens, recs = [], [], []
        for t in range(p, n):
            if t > p:
                index.append(k[:, t - 1], v[:, t - 1])
            o_hat = index.attend(q[:, t])
            o = full_attention(q[:, t].astype(np.float64), k[:, :t].astype(np.float64), v[:, :t].astype(np.float64))
            errs.append(float(np.linalg.norm(o - o_hat) / np.linalg.norm(o)))
            st = index.last_stats
            dens.append(float(st.density))
            if getattr(st, "exact_ids", None) is not None:
                recs.append(_recall(q[:, t], k[:, :t], st.exact_ids, k_recall))
        rows.append({"layer": layer, "error": float(np.median(errs)), "density": float(np.mean(dens)),
                     "recall": float(np.mean(recs)) if recs else float("nan")})
    return rows


def _recall(q, k, exact_ids, kk):
    """recall@kk of the exactly attended set, per KV head against the GQA group's summed top scores."""
    hkv = k.shape[0]
    g = q.shape[0] // hkv
    out = []
    for h in range(hkv):
        s = (q[h * g:(h + 1) * g] @ k[h].T).max(axis=0)
        top = np.argpartition(-s, min(kk, len(s)) - 1)[:kk]
        out.append(np.isin(top, exact_ids[h]).mean())
    return float(np.mean(out))


def markdown_table(rows, columns):
    """Rows of dicts as a markdown table, floats with 3 significant decimals."""
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

