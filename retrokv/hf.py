"""Generation with retrieval attention inside any Llama-family transformers model.

``attach(model, method="wave")`` registers one attention function in transformers'
``AttentionInterface`` registry and switches the model to it; plain ``model.generate(...)`` then runs
with the method, greedy or sampling, batched or not, with ``TextStreamer``. ``detach(model)`` restores
the previous attention implementation. No model code is copied or patched.

* **Prefill** (a forward pass with more than one new token) runs dense (transformers' SDPA) and then
  builds the method's index for every layer, per sequence of the batch (the batch is flattened into
  the head axis per DESIGN.md only within a sequence; each sequence has its own index, built on its
  non-padding tokens).
* **Decode** (one new token): the new key/value is appended to the index (it joins the steady/static
  window, RetroInfer §4.1 / RetrievalAttention §3.3) and the query attends through the index.
* ``dense_layers`` keeps some layers exact (Quest keeps the first two layers dense).

Statistics of every decode step are gathered per layer; :meth:`Attached.layer_stats` averages them.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from .backend import module as backend_module
from .backend import resolve

METHODS = ("full", "streaming", "topk", "quest", "ivf", "wave", "graph")
_ATTN_NAME = "retrokv"
_ATTACHED = "_retrokv_attached"


class DenseIndex:
    """Full attention with the index interface (``method="full"``): every token is read exactly.

    Each KV head keeps its own growable ``(capacity, d)`` buffer, so the first ``n`` rows are one
    contiguous block the attention kernel reads in place (no per-step copy).
    """

    def __init__(self, keys, values, backend=None):
        self.backend = resolve(backend)
        self._core = backend_module(self.backend)
        hkv, n, d = keys.shape
        cap = max(16, 2 * n)
        self._k = [np.empty((cap, d), np.float32) for _ in range(hkv)]
        self._v = [np.empty((cap, values.shape[2]), np.float32) for _ in range(hkv)]
        for h in range(hkv):
            self._k[h][:n], self._v[h][:n] = keys[h], values[h]
        self.n_tokens = n
        self.last_stats = {}

    @classmethod
    def build(cls, keys, values, config=None, backend=None):
        return cls(np.asarray(keys, np.float32), np.asarray(values, np.float32), backend)

    def append(self, k, v):
        n = self.n_tokens
        for h in range(len(self._k)):
            if n == self._k[h].shape[0]:
                self._k[h] = np.concatenate([self._k[h], np.empty_like(self._k[h])])
                self._v[h] = np.concatenate([self._v[h], np.empty_like(self._v[h])])
            self._k[h][n], self._v[h][n] = k[h], v[h]
        self.n_tokens = n + 1

    def attend(self, q, return_lse=False):
        n, hkv = self.n_tokens, len(self._k)
        hq, d = q.shape
        g = hq // hkv
        parts = [self._core.partial_attention(q[h * g:(h + 1) * g], self._k[h][None, :n], self._v[h][None, :n])
                 for h in range(hkv)]
        out = np.concatenate([p[0] for p in parts])
        lse = np.concatenate([p[1] for p in parts])
        self.last_stats = {"tokens_attended": hq * n, "keys_scored": hq * n, "density": 1.0,
                           "bytes_read": hkv * n * 8 * d}
        return (out, lse) if return_lse else out


def index_cache(n_layers=None, length=0):
    """A transformers ``Cache`` that keeps no KV of its own: the attached method's indexes hold it.

    With the default ``DynamicCache`` transformers keeps a second full copy of the KV and grows it
    by concatenation every step, an O(N) copy per layer and token that would hide what a sparse
    method saves. Pass ``cache=index_cache()`` to ``generate`` or a forward pass. It supports one
    prefill followed by single-token steps (no chunked prefill, no beam search).
    ``n_layers`` and ``length`` make a cache that resumes after a prefill of ``length`` tokens whose
    indexes were built elsewhere (:meth:`Attached.rebuild`).
    """
    from transformers.cache_utils import Cache, DynamicLayer

    class IndexLayer(DynamicLayer):
        """Counts tokens and passes the new ones through; stores nothing."""

        is_croppable = False

        def __init__(self, length=0, **kwargs):
            super().__init__(**kwargs)
            self.length = length

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.length and key_states.shape[-2] != 1:
                raise ValueError("index_cache supports one prefill, then one token per step; got "
                                 f"{key_states.shape[-2]} new tokens after {self.length}")
            self.length += key_states.shape[-2]
            return key_states, value_states

        def get_seq_length(self):
            return self.length

    if n_layers is None:
        if length:
            raise ValueError("index_cache: give n_layers with a nonzero length")
        return Cache(layer_class_to_replicate=IndexLayer)
    return Cache(layers=[IndexLayer(length) for _ in range(n_layers)])


def _index_class(method):
    if method == "full":
        return DenseIndex
    if method in ("wave",):
        from .wave import WaveIndex
        return WaveIndex
    if method == "graph":
        from .graph import GraphIndex
        return GraphIndex
    from . import baselines
    return {"streaming": baselines.StreamingLLM, "topk": baselines.TopKOracle,
            "quest": baselines.QuestIndex, "ivf": baselines.IVFIndex}[method]


def build_index(method, keys, values, prefill_queries, config=None, backend=None):
    """One layer's index for ``method`` over ``keys, values (Hkv, N, d)``; only the graph index
    uses the prefill queries (RetrievalAttention projects them onto the key graph)."""
    cls = _index_class(method)
    if method == "graph":
        return cls.build(keys, values, prefill_queries, config=config, backend=backend)
    return cls.build(keys, values, config=config, backend=backend)


class Attached:
    """Handle returned by :func:`attach`: the method, its per-layer indexes and their statistics."""

    def __init__(self, model, method, config, backend, dense_layers, previous):
        self.model, self.method, self.config, self.backend = model, method, config, backend
        self.dense_layers = frozenset(dense_layers)
        self.previous = previous
        self.indexes = {}                   # layer -> list of per-sequence indexes
        self.stats = defaultdict(list)      # layer -> list of per-step stats dicts
        self.build_calls = 0
        # True: only save the prefill's Q/K/V (numpy) for rebuild(); no index is built on this handle,
        # so a second handle can build from the copy without a throwaway index per layer.
        self.keep_prefill = False
        self.prefill = {}

    def reset_stats(self):
        """Forget the statistics gathered so far (the indexes stay)."""
        self.stats.clear()

    def layer_stats(self):
        """Per layer, the mean over decode steps (and sequences) of every numeric statistic."""
        out = {}
        for layer, steps in sorted(self.stats.items()):
            keys = {k for s in steps for k, v in s.items() if isinstance(v, (int, float, np.integer, np.floating))}
            out[layer] = {k: float(np.mean([s[k] for s in steps if k in s])) for k in sorted(keys)}
            out[layer]["steps"] = len(steps)
        return out

    def mean_density(self):
        """Mean fraction of the context read exactly, over layers and decode steps (1.0 for dense)."""
        per_layer = [s.get("density", 1.0) for s in self.layer_stats().values()]
        return float(np.mean(per_layer)) if per_layer else float("nan")

    # ------------------------------------------------------------------ the attention function
    def _build(self, layer, q, k, v, valid):
        """One index per sequence, over its valid (non-padding) tokens."""
        method = "full" if layer in self.dense_layers else self.method
        built = []
        for b in range(k.shape[0]):
            kb, vb = k[b][:, valid[b]], v[b][:, valid[b]]                  # (Hkv, N_b, d)
            qb = q[b][:, valid[b][-q.shape[2]:]]                           # prefill queries (Hq, T_b, d)
            built.append(build_index(method, kb, vb, qb, self.config, self.backend))
        self.indexes[layer] = built
        self.build_calls += 1

    def rebuild(self, prefill):
        """Build this method's indexes from another handle's saved prefill (``keep_prefill=True``),
        so several methods can share one dense prefill (the evaluation harness does this)."""
        for layer, (q, k, v, valid) in prefill.items():
            self._build(layer, q, k, v, valid)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        b, hq, t, d = query.shape
        n = key.shape[2]
        idx = self.indexes.get(layer)
        # Decode through the index when it matches the cache: an IndexCache hands over only the new
        # token; a DynamicCache hands over everything, which must be the index's tokens plus one.
        decode = t == 1 and idx is not None and len(idx) == b and (
            n == 1 or idx[0].n_tokens + 1 == n - _pad_count(attention_mask, 0))
        if not decode:
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            valid = _valid_keys(attention_mask, b, n)
            with torch.no_grad():
                qkv = _np(query), _np(key), _np(value)
                if not self.keep_prefill:
                    self._build(layer, *qkv, valid)
                elif layer in self.prefill:
                    raise RuntimeError("a keep_prefill handle saves one prefill and cannot decode; attach a "
                                       "method and call rebuild() with this handle's .prefill")
                else:
                    self.prefill[layer] = (*qkv, valid)
            return out, w
        scaling = kwargs.get("scaling")
        if scaling is not None and abs(scaling * d ** 0.5 - 1) > 1e-6:
            raise ValueError(f"layer {layer} scales scores by {scaling}; retrokv's indexes use "
                                      f"1/sqrt(head_dim) = {d ** -0.5:.6g}")
        qn, kn, vn = _np(query[:, :, 0]), _np(key[:, :, -1]), _np(value[:, :, -1])   # (B, H, d)
        outs = []
        for s, index in enumerate(idx):
            index.append(kn[s], vn[s])
            outs.append(index.attend(qn[s]))
            self.stats[layer].append(_scalars(index.last_stats))
        out = torch.from_numpy(np.stack(outs)).to(query.dtype)[:, None]       # (B, 1, Hq, d)
        return out, None


def _scalars(stats):
    """The numeric scalar statistics of one step (WaveStats or a dict); arrays are dropped to save memory."""
    items = ((f.name, getattr(stats, f.name)) for f in dataclasses.fields(stats)) \
        if dataclasses.is_dataclass(stats) else stats.items()
    return {k: v for k, v in items if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


def _np(x):
    return x.detach().float().contiguous().numpy()


def _valid_keys(mask, b, n):
    """Per sequence, a boolean (N,) of keys the last query may see (False for left padding)."""
    if mask is None:
        return np.ones((b, n), bool)
    m = mask[:, 0, -1, :n].detach().numpy()
    allowed = m if m.dtype == bool else m > -1e30       # bool masks: True = attend; float: 0 or -inf/min
    return np.broadcast_to(allowed, (b, n)).astype(bool)


def _pad_count(mask, s):
    if mask is None:
        return 0
    return int((~_valid_keys(mask, mask.shape[0], mask.shape[-1])[s]).sum())


def attach(model, method="wave", config=None, backend=None, dense_layers=()):
    """Make ``model.generate`` (and plain forward passes) use ``method`` for decode attention.

    Args:
        model: a Llama-family transformers model (its attention layers call the attention registry).
        method: one of ``"full", "streaming", "topk", "quest", "ivf", "wave", "graph"``.
        config: the method's config dataclass (``WaveConfig``, ``GraphConfig``, ``IVFConfig``, ...);
            default: the paper's defaults.
        backend: ``"reference"`` or ``"fast"`` (default: :func:`retrokv.get_backend`).
        dense_layers: layer indices kept exact (full attention).

    Returns:
        An :class:`Attached` handle (also stored on the model); :func:`detach` undoes it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if config is not None and not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a config dataclass (e.g. WaveConfig), got {type(config).__name__}")
    backend = resolve(backend)
    modules = model.modules() if hasattr(model, "modules") and hasattr(model, "config") else ()
    layers = [m for m in modules if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no Llama-style attention layers (k_proj, layer_idx)")
    dense_layers = [_layer_index(i, len(layers)) for i in dense_layers]
    if getattr(model, _ATTACHED, None) is not None:
        detach(model)
    handle = Attached(model, method, config, backend, dense_layers, model.config._attn_implementation)
    name = f"{_ATTN_NAME}_{id(handle):x}"            # one registry entry per attached model
    AttentionInterface.register(name, handle)
    # Without a registered mask function transformers hands a custom attention the raw 2-D padding
    # mask; the prefill runs SDPA, so it needs SDPA's 4-D boolean mask.
    AttentionMaskInterface.register(name, sdpa_mask)
    handle.name = name
    model.set_attn_implementation(name)
    setattr(model, _ATTACHED, handle)
    return handle


def _layer_index(i, n):
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
        raise ValueError(f"dense_layers entries must be layer indices in [0, {n}), got {i!r}")
    return int(i)


def detach(model):
    """Restore the attention implementation the model had before :func:`attach`; returns the old handle."""
    handle = getattr(model, _ATTACHED, None)
    if handle is None:
        raise ValueError("detach: this model has no retrokv method attached")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model.set_attn_implementation(handle.previous)
    setattr(model, _ATTACHED, None)
    for registry in (AttentionInterface, AttentionMaskInterface):
        registry._global_mapping.pop(handle.name, None)
    handle.indexes.clear()
    return handle
