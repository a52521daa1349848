"""The SmolLM2 side of benchmarks/lazy_rag.py: a synthetic fact pool and four ways to serve a RAG request.

Lazy reuse and Block-Attention run the question through the model with a custom attention function
registered in transformers' AttentionInterface: the question's own keys/values live in an ordinary
DynamicCache (RoPE at their logical positions, passed as ``position_ids``), the documents' in a
:class:`retrokv.lazy.DocumentStore` that the function reads per layer.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import retrokv as rk
from retrokv.harness.data import natural_text
from retrokv.lazy import DocumentStore, LazyConfig
from retrokv.harness.models import load_smollm2

_NAME = "retrokv_lazy_rag"
_CTX = {}                       # the store and request the registered attention function reads
ANSWER_TOKENS = 6

ADJ = ["Amber", "Cobalt", "Crimson", "Silver", "Golden", "Ivory", "Jade", "Onyx", "Scarlet", "Azure",
       "Violet", "Copper", "Emerald", "Indigo", "Saffron", "Obsidian", "Coral", "Pearl"]
NOUN = ["Falcon", "Harbor", "Lantern", "Meadow", "Orchid", "Summit", "Glacier", "Compass", "Beacon",
        "Willow", "Canyon", "Comet", "Anchor", "Thistle", "Raven", "Delta"]


def _lazy_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of the question (or a decode token) over the request's documents and its own tail."""
    store, req = _CTX.get("store"), _CTX.get("request")
    if store is None:                # a document prefilled alone: the model's own attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    q, k, v = query[0].numpy(), key[0].numpy(), value[0].numpy()     # (Hq, T, d), (Hkv, M, d)
    if q.shape[1] == 1:
        out = store.decode_attention(req, q[:, 0], k, v, layer=module.layer_idx)[:, None]
    else:
        out = store.prefill_attention(req, q, k, v, layer=module.layer_idx)
    return torch.from_numpy(out).transpose(0, 1)[None], None         # (1, T, Hq, d) as HF expects


AttentionInterface.register(_NAME, _lazy_attention)


@dataclass
class Pool:
    model: object
    tok: object
    preamble: list              # chat preamble ids: document 0 at offset 0 (the attention sink)
    docs: list                  # token ids per document
    questions: list             # question + answer-prefix ids per document
    answers: list               # the fact's number as text
    mean_tokens: float


def build_pool(n_docs, seed=0):
    """``n_docs`` documents: one fact ("the access code of the X Y project is NNNN") among prose."""
    model, tok = load_smollm2()
    rng = np.random.default_rng(seed)
    prose = natural_text(400 * n_docs).split("\n\n")
    prose = [p.replace("\n", " ") for p in prose if len(p) > 200]
    names = [f"{a} {n}" for a in ADJ for n in NOUN]
    picks = rng.choice(len(names), size=n_docs, replace=False)
    docs, questions, answers = [], [], []
    for i in range(n_docs):
        name, code = names[picks[i]], str(int(rng.integers(1000, 10000)))
        filler = prose[i % len(prose)][:int(rng.integers(150, 350))]
        fact = f"The access code of the {name} project is {code}."
        text = f"Document: {filler[:len(filler) // 2]} {fact} {filler[len(filler) // 2:]}\n\n"
        docs.append(tok(text, add_special_tokens=False)["input_ids"])
        q = (f"Question: What is the access code of the {name} project?<|im_end|>\n<|im_start|>assistant\n"
             f"The access code of the {name} project is")
        questions.append(tok(q, add_special_tokens=False)["input_ids"])
        answers.append(code)
    pre = tok("<|im_start|>system\nYou are a helpful assistant. Answer the question from the documents."
              "<|im_end|>\n<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    return Pool(model, tok, pre, docs, questions, answers, float(np.mean([len(d) for d in docs])))


class RAGSystem:
    METHODS = ("full", "prefix", "block", "lazy")
    LABELS = {"full": "full re-prefill", "prefix": "prefix caching", "block": "Block-Attention (materialised)",
              "lazy": "LazyAttention (lazy reuse)"}

    def __init__(self, pool, budget, backend="fast"):
        self.pool, self.budget, self.backend = pool, budget, backend
        self.model, self.tok = pool.model, pool.tok
        self.theta = float(self.model.config.rope_parameters["rope_theta"])
        self.stop = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.reset()

    def reset(self):
        cfg = LazyConfig(theta=self.theta, capacity_tokens=self.budget)
        self.lazy = DocumentStore(cfg, backend=self.backend)
        self.block = DocumentStore(cfg, backend=self.backend)
        self.block_where = {}
        self.prefix = OrderedDict()                      # path of piece ids -> (keys, values) per layer
        self.counts = {k: 0 for k in ("prefix_hit", "prefix_miss", "block_hit", "block_rerotate",
                                      "block_prefill", "lazy_hit", "lazy_prefill")}

    def hit_stats(self):
        return dict(self.counts)

    # ---- model helpers ----------------------------------------------------------------------------
    def _forward(self, ids, **kw):
        with torch.no_grad():
            return self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1, **kw)

    def _doc_kv(self, ids):
        """Prefill a document alone from position 0: (layers, Hkv, L, d) keys and values."""
        _CTX["store"] = None
        cache = self._forward(ids).past_key_values
        return (np.stack([layer.keys[0].numpy() for layer in cache.layers]),
                np.stack([layer.values[0].numpy() for layer in cache.layers]))

    def _generate(self, first, cache, pos, explicit_positions):
        out = [first]
        for _ in range(ANSWER_TOKENS - 1):
            if out[-1] == self.stop:
                break
            kw = {"position_ids": torch.tensor([[pos]])} if explicit_positions else {}
            logits = self._forward([out[-1]], past_key_values=cache, **kw).logits
            out.append(int(logits[0, -1].argmax()))
            pos += 1
        return self.tok.decode([t for t in out if t != self.stop])

    # ---- the four methods -------------------------------------------------------------------------
    def serve(self, method, doc_ids, target):
        pieces = [self.pool.preamble] + [self.pool.docs[i] for i in doc_ids]
        names = ["pre"] + list(doc_ids)
        question = self.pool.questions[target]
        self.model.set_attn_implementation("sdpa" if method in ("full", "prefix") else _NAME)
        return getattr(self, "_" + method)(pieces, names, question)

    def _full(self, pieces, names, question):
        ids = [t for p in pieces for t in p] + question
        t0 = time.perf_counter()
        out = self._forward(ids)
        first = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        return ttft, self._generate(first, out.past_key_values, len(ids), False)

    def _prefix(self, pieces, names, question):
        t0 = time.perf_counter()
        hit = 0
        while hit < len(pieces) and tuple(names[:hit + 1]) in self.prefix:
            hit += 1
        cache = DynamicCache()
        if hit:
            nodes = [self.prefix[tuple(names[:j + 1])] for j in range(hit)]
            for j in range(hit):
                self.prefix.move_to_end(tuple(names[:j + 1]))
            for layer in range(self.model.config.num_hidden_layers):
                cache.update(torch.cat([n[0][layer] for n in nodes], 2), torch.cat([n[1][layer] for n in nodes], 2), layer)
        rest = [t for p in pieces[hit:] for t in p] + question
        out = self._forward(rest, past_key_values=cache)
        first = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        self.counts["prefix_hit"] += hit
        self.counts["prefix_miss"] += len(pieces) - hit
        start = sum(len(p) for p in pieces[:hit])        # store the newly computed document prefixes
        for j in range(hit, len(pieces)):
            end = start + len(pieces[j])
            layers = out.past_key_values.layers
            self.prefix[tuple(names[:j + 1])] = ([layer.keys[:, :, start:end].clone() for layer in layers],
                                                 [layer.values[:, :, start:end].clone() for layer in layers])
            start = end
        while sum(n[0][0].shape[2] for n in self.prefix.values()) > self.budget:
            self.prefix.popitem(last=False)
        return ttft, self._generate(first, out.past_key_values, 0, False)

    def _question(self, store, req, question):
        _CTX["store"], _CTX["request"] = store, req
        cache = DynamicCache()
        pos = torch.arange(req.question_start, req.question_start + len(question))[None]
        out = self._forward(question, past_key_values=cache, position_ids=pos)
        return int(out.logits[0, -1].argmax()), cache

    def _block(self, pieces, names, question):
        t0 = time.perf_counter()
        keys, off = [], 0
        for ids, name in zip(pieces, names):
            key = (name, off)
            if key in self.block:
                self.block.get(key)
                self.counts["block_hit"] += 1
            else:
                where = [o for o in self.block_where.get(name, ()) if (name, o) in self.block]
                if where:      # Block-Attention: copy a stored block and re-rotate it to the new offset
                    k, v = self.block.read((name, where[0]))
                    k = rk.rotate_by(k, off - where[0], self.theta, backend=self.backend)
                    self.counts["block_rerotate"] += 1
                else:          # not cached anywhere: prefill alone, rotate to the offset
                    k, v = self._doc_kv(ids)
                    k = rk.rotate_by(k, off, self.theta, backend=self.backend)
                    self.counts["block_prefill"] += 1
                self.block.put(ids, k, v, key=key)
                self.block_where.setdefault(name, set()).add(off)
            keys.append(key)
            off += len(ids)
        req = self.block.request(keys, positioned=True)
        first, cache = self._question(self.block, req, question)
        ttft = time.perf_counter() - t0
        return ttft, self._generate(first, cache, req.question_start + len(question), True)

    def _lazy(self, pieces, names, question):
        t0 = time.perf_counter()
        for ids in pieces:
            if ids in self.lazy:
                self.lazy.get(ids)
                self.counts["lazy_hit"] += 1
            else:
                self.lazy.put(ids, *self._doc_kv(ids))
                self.counts["lazy_prefill"] += 1
        req = self.lazy.request(pieces)
        first, cache = self._question(self.lazy, req, question)
        ttft = time.perf_counter() - t0
        return ttft, self._generate(first, cache, req.question_start + len(question), True)
