"""Generation with retrieval attention inside any Llama-family transformers model.

``attach(model, method="wave")`` registers one attention function in transformers'
``AttentionInterface`` registry and switches the model to it; plain ``model.generate(...)`` then runs
with the method, greedy or sampling, batched or not, with ``TextStreamer``. ``detach(model)`` restores
the previous attention implementation. No model code is copied or patched.

* **Prefill** (any forward pass that does not continue the sequences the indexes hold: a prompt,
  including a one-token prompt of a new ``generate``) runs dense (transformers' SDPA) and then
  builds the method's index (through :mod:`retrokv.methods`) for every layer, per sequence of the batch (the batch is flattened into
  the head axis only within a sequence; each sequence has its own index, built on its
  non-padding tokens).
* **Decode** (one new token at the position that follows each index's tokens): the new key/value is appended to the index (it joins the steady/static
  window, RetroInfer §4.1 / RetrievalAttention §3.3) and the query attends through the index.
* ``dense_layers`` keeps some layers exact (Quest keeps the first two layers dense); ``layer_configs`` gives
  some layers their own config of the method.
* Beam search is refused with a clear ``ValueError`` (the indexes cannot follow the cache's beam
  reorders); chunked prefill is not supported (``index_cache`` refuses it; with ``DynamicCache`` a
  second multi-token pass rebuilds the indexes from the whole cache).

Statistics of every decode step are gathered per layer; :meth:`Attached.layer_stats` averages them.
:attr:`Attached.decode_seconds` is the wall time spent inside retrokv at decode (the tensors' hand-over,
``append`` and ``attend`` of every layer; on a GPU it counts launches, which are asynchronous), so a
benchmark can split a step into retrokv and the rest of the model (``benchmarks/decode_speed.py``).
"""
from __future__ import annotations

import time
import warnings
from collections import defaultdict

import numpy as np

from . import methods
from ._xp import check_device, is_cupy, resolve_device, to_device, xp
from .backend import impl, resolve

_ATTN_NAME = "retrokv"
_ATTACHED = "_retrokv_attached"
BEAM_SEARCH_ERROR = ("beam search (num_beams > 1) is not supported with retrokv methods: the per-layer indexes "
                     "cannot be reordered with the cache's beams; use num_beams=1 (greedy or sampling) or detach()")


def __getattr__(name):
    if name == "METHODS":           # the method list lives once, in the registry
        return methods.names()
    raise AttributeError(f"module 'retrokv.hf' has no attribute {name!r}")


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

        def reorder_cache(self, beam_idx):
            raise ValueError(BEAM_SEARCH_ERROR)

    if n_layers is None:
        if length:
            raise ValueError("index_cache: give n_layers with a nonzero length")
        cache = Cache(layer_class_to_replicate=IndexLayer)
    else:
        cache = Cache(layers=[IndexLayer(length) for _ in range(n_layers)])
    _refuse_beams(cache)
    return cache


def _refuse_beams(cache):
    """Make ``cache.reorder_cache`` (what beam search calls between steps) raise a clear error: the
    indexes hold the KV per sequence and a silent reorder of the cache alone would desynchronise them."""
    def reorder_cache(beam_idx):
        raise ValueError(BEAM_SEARCH_ERROR)
    cache.reorder_cache = reorder_cache
    cache._retrokv_guarded = True


class Attached:
    """Handle returned by :func:`attach`: the method, its per-layer indexes and their statistics."""

    def __init__(self, model, method, config, backend, dense_layers, previous, device=None, layer_configs=None):
        self.model, self.method, self.config, self.backend = model, method, config, backend
        self.device = device                # None: each layer's tensors decide (CUDA tensors: "cuda")
        self.dense_layers = frozenset(dense_layers)
        self.layer_configs = dict(layer_configs or {})      # layer -> its own config (else ``config``)
        self.previous = previous
        self.indexes = {}                   # layer -> list of per-sequence indexes
        self.stats = defaultdict(list)      # layer -> list of per-step stats dicts
        self.build_calls = 0
        self.decode_seconds = 0.0          # wall time inside the decode branch, all layers and steps
        self.decode_calls = 0              # layer calls that decoded through an index
        # True: only save the prefill's Q/K/V (numpy) for rebuild(); no index is built on this handle,
        # so a second handle can build from the copy without a throwaway index per layer.
        self.keep_prefill = False
        self.prefill = {}

    def reset_stats(self):
        """Forget the statistics and decode timings gathered so far (the indexes stay)."""
        self.stats.clear()
        self.decode_seconds, self.decode_calls = 0.0, 0

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
        config = None if method != self.method else self.layer_configs.get(layer, self.config)
        m = xp(k)                                                          # CuPy when the KV is on the GPU
        built = []
        for b in range(k.shape[0]):
            keep = m.asarray(valid[b])
            kb, vb = k[b][:, keep], v[b][:, keep]                          # (Hkv, N_b, d)
            qb = q[b][:, keep[-q.shape[2]:]]                               # prefill queries (Hq, T_b, d)
            built.append(methods.build(method, kb, vb, qb, config=config, backend=self.backend,
                                       device=self.device))
        self.indexes[layer] = built
        self.build_calls += 1

    def rebuild(self, prefill, progress=False):
        """Build this method's indexes from another handle's saved prefill (``keep_prefill=True``),
        so several methods can share one dense prefill (the evaluation harness does this).
        ``progress``: show a bar over the layers (a graph build takes seconds per layer)."""
        from tqdm.auto import tqdm

        for layer, (q, k, v, valid) in tqdm(prefill.items(), desc=f"build {self.method} (layers)",
                                            disable=not progress, leave=False):
            self._build(layer, q, k, v, valid)

    @staticmethod
    def _continues(idx, n, attention_mask, kwargs):
        """True when this one-token forward is the next decode step of the sequences the indexes hold.

        Decided from state, never from the token count alone: the query's position (``position_ids``,
        what the model itself uses for RoPE) must equal each index's length, and with a cache that
        hands over every key (``DynamicCache``) the keys must be the index's tokens plus this one. A new
        ``generate`` starts at position 0 with a fresh cache, so it builds new indexes even for a
        one-token prompt.
        """
        pos = kwargs.get("position_ids")
        for s, index in enumerate(idx):
            if pos is not None and int(pos[min(s, pos.shape[0] - 1), -1]) != index.n_tokens:
                return False
            if n != 1 and index.n_tokens + 1 != n - _pad_count(attention_mask, s):
                return False
        return True

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = module.layer_idx
        device = resolve_device(self.device, query)      # CUDA tensors with device='cpu' are refused
        b, hq, t, d = query.shape
        n = key.shape[2]
        idx = self.indexes.get(layer)
        decode = t == 1 and idx is not None and len(idx) == b and self._continues(idx, n, attention_mask, kwargs)
        if not decode:
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
            valid = _valid_keys(attention_mask, b, n)
            with torch.no_grad():
                qkv = _arr(query, device), _arr(key, device), _arr(value, device)
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
        t0 = time.perf_counter()
        qn, kn, vn = (_arr(x, device) for x in (query[:, :, 0], key[:, :, -1], value[:, :, -1]))   # (B, H, d)
        outs = []
        for s, index in enumerate(idx):
            index.append(kn[s], vn[s])
            outs.append(index.attend(qn[s]))
            self.stats[layer].append(index.last_stats.scalars())     # host values on either device
        stacked = outs[0][None] if len(outs) == 1 else xp(*outs).stack(outs)      # batch of one: a view
        # back to torch without a copy: DLPack on the GPU (the step never leaves it), .from_numpy on the CPU
        out = torch.from_dlpack(stacked) if is_cupy(stacked) else torch.from_numpy(stacked)
        out = out.to(device=query.device, dtype=query.dtype)[:, None]            # (B, 1, Hq, d)
        self.decode_seconds += time.perf_counter() - t0
        self.decode_calls += 1
        return out, None


def _np(x):
    return x.detach().float().contiguous().numpy()


def _arr(x, device):
    """A torch tensor as float32 NumPy (CPU) or device array (``device="cuda"``).

    A CUDA tensor crosses to CuPy by DLPack (no host copy). A CPU tensor with ``device="cuda"`` (asked
    for explicitly) is uploaded; under Numba's CUDA simulator the "device" array is NumPy, which is
    how the tests run this path without a GPU."""
    if device == "cuda" and x.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(x.detach().float().contiguous())
    return to_device(_np(x), device)


def _valid_keys(mask, b, n):
    """Per sequence, a boolean (N,) of keys the last query may see (False for left padding)."""
    if mask is None:
        return np.ones((b, n), bool)
    m = mask[:, 0, -1, :n].detach().cpu().numpy()        # (B, N) booleans: control data, read on the host
    allowed = m if m.dtype == bool else m > -1e30       # bool masks: True = attend; float: 0 or -inf/min
    return np.broadcast_to(allowed, (b, n)).astype(bool)


def _pad_count(mask, s):
    if mask is None:
        return 0
    return int((~_valid_keys(mask, mask.shape[0], mask.shape[-1])[s]).sum())


def attach(model, method="wave", config=None, backend=None, dense_layers=(), *, device: str | None = None,
           layer_configs=None):
    """Make ``model.generate`` (and plain forward passes) use ``method`` for decode attention.

    Args:
        model: a Llama-family transformers model (its attention layers call the attention registry).
        method: one of ``"full", "streaming", "topk", "quest", "ivf", "wave", "graph"``.
        config: the method's config dataclass (``WaveConfig``, ``GraphConfig``, ``IVFConfig``, ...);
            default: the paper's defaults.
        backend: ``"reference"`` or ``"fast"`` (default: :func:`retrokv.get_backend`).
        dense_layers: layer indices kept exact (full attention).
        device: ``None`` (the model's tensors decide: CUDA tensors mean ``"cuda"``), ``"cpu"`` or
            ``"cuda"`` (``backend="fast"``): the indexes are built on the GPU from the prefill's KV,
            handed over by DLPack, and each decode step reads and returns CUDA tensors (DLPack both
            ways). The baselines (``streaming``, ``topk``, ``quest``, ``ivf``) have no GPU path and refuse ``"cuda"``.
        layer_configs: ``{layer index: config}``, the configs of layers that differ from ``config`` (same
            class), e.g. ``{7: GraphConfig(n_sink=4, n_recent=64, search_L=1000)}``: a wider graph beam at
            one layer (docs/frontier.md, "Why the graph index misses needles at 8K").

    Returns:
        An :class:`Attached` handle (also stored on the model); :func:`detach` undoes it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    spec = methods.get(method)
    if config is not None and not isinstance(config, spec.config_class):
        raise TypeError(f"method {method!r} takes a {spec.config} config, got {type(config).__name__}")
    backend = resolve(backend)
    if check_device(device) == "cuda":
        impl(backend, "attention", device)                  # device='cuda' needs backend='fast': say so now
    _warn_if_torch_first(backend)
    modules = model.modules() if hasattr(model, "modules") and hasattr(model, "config") else ()
    layers = [m for m in modules if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not layers:
        raise TypeError(f"{type(model).__name__} has no Llama-style attention layers (k_proj, layer_idx)")
    dense_layers = [_layer_index(i, len(layers)) for i in dense_layers]
    if not isinstance(layer_configs or {}, dict):
        raise TypeError(f"layer_configs must be a dict {{layer index: config}}, got {type(layer_configs).__name__}")
    layer_configs = {_layer_index(i, len(layers), "layer_configs"): c for i, c in (layer_configs or {}).items()}
    for i, c in layer_configs.items():
        if not isinstance(c, spec.config_class):
            raise TypeError(f"layer_configs[{i}]: method {method!r} takes a {spec.config} config, "
                            f"got {type(c).__name__}")
    if getattr(model, _ATTACHED, None) is not None:
        detach(model)
    handle = Attached(model, method, config, backend, dense_layers, model.config._attn_implementation, device,
                      layer_configs)
    name = f"{_ATTN_NAME}_{id(handle):x}"            # one registry entry per attached model
    AttentionInterface.register(name, handle)
    # Without a registered mask function transformers hands a custom attention the raw 2-D padding
    # mask; the prefill runs SDPA, so it needs SDPA's 4-D boolean mask.
    AttentionMaskInterface.register(name, sdpa_mask)
    handle.name = name
    model.set_attn_implementation(name)
    handle._hook = model.register_forward_pre_hook(_guard_cache, with_kwargs=True)
    setattr(model, _ATTACHED, handle)
    return handle


_WARNED = []


def _warn_if_torch_first(backend):
    """Once per process: torch was imported before retrokv, so its OpenMP threads spin (see
    ``retrokv/__init__.py``) and the fast kernels share the cores with them."""
    import retrokv

    if backend == "fast" and retrokv._TORCH_LOADED_FIRST and not _WARNED:
        _WARNED.append(True)
        warnings.warn("torch was imported before retrokv, so its OpenMP threads spin between operations and "
                      "slow retrokv's parallel kernels (the wave index builds 2-3x slower on 2 cores); "
                      "import retrokv before torch, or set OMP_WAIT_POLICY=passive in the environment",
                      RuntimeWarning, stacklevel=3)


def _guard_cache(module, args, kwargs):
    """Forward pre-hook: whatever cache a forward pass uses (``DynamicCache`` by default) refuses beam reorders."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not getattr(cache, "_retrokv_guarded", False):
        _refuse_beams(cache)


def _layer_index(i, n, name="dense_layers"):
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
        raise ValueError(f"{name} entries must be layer indices in [0, {n}), got {i!r}")
    return int(i)


def detach(model):
    """Restore the attention implementation the model had before :func:`attach`; returns the old handle."""
    handle = getattr(model, _ATTACHED, None)
    if handle is None:
        raise ValueError("detach: this model has no retrokv method attached")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model.set_attn_implementation(handle.previous)
    handle._hook.remove()
    setattr(model, _ATTACHED, None)
    for registry in (AttentionInterface, AttentionMaskInterface):
        registry._global_mapping.pop(handle.name, None)
    handle.indexes.clear()
    return handle
