"""The method registry: one name per decode index, its config class and its index class.

The transformers glue (:mod:`retrokv.hf`) and the harness (:mod:`retrokv.harness`) choose a method
only through this module, as kvpress's presses are chosen by name::

    from retrokv import methods
    methods.names()                                  # ('full', 'streaming', 'topk', 'quest', 'ivf', 'wave', 'graph')
    index = methods.build("wave", keys, values, config=None, backend="fast")
    cfg = methods.default_config("streaming", n_tokens=8192)

Every registered index class implements :class:`retrokv.index.DecodeIndex`.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

__all__ = ["Method", "REGISTRY", "names", "get", "build", "default_config"]


@dataclass(frozen=True)
class Method:
    """One registered method: where its config and index classes live, and what it is."""

    name: str
    module: str          # module under retrokv that defines both classes
    config: str          # config class name
    index: str           # index class name
    needs_queries: bool  # True: build() requires prefill_queries
    summary: str

    @property
    def config_class(self):
        return getattr(importlib.import_module(f"retrokv.{self.module}"), self.config)

    @property
    def index_class(self):
        return getattr(importlib.import_module(f"retrokv.{self.module}"), self.index)


REGISTRY = {m.name: m for m in (
    Method("full", "dense", "DenseConfig", "DenseIndex", False, "full attention: every token, exactly"),
    Method("streaming", "baselines", "StreamingConfig", "StreamingLLM", False,
           "StreamingLLM: attention sinks + a sliding window; the rest is evicted"),
    Method("topk", "baselines", "TopKConfig", "TopKOracle", False,
           "exact top-k: scores every key (the ceiling of any index at budget k)"),
    Method("quest", "baselines", "QuestConfig", "QuestIndex", False,
           "Quest: page min/max bounds, reads the best pages"),
    Method("ivf", "baselines", "IVFConfig", "IVFIndex", False, "IVF: k-means lists probed by centroid score"),
    Method("wave", "wave_index", "WaveConfig", "WaveIndex", False,
           "RetroInfer's wave index: tripartite attention over clusters"),
    Method("graph", "graph_index", "GraphConfig", "GraphIndex", True,
           "RetrievalAttention: attention-aware graph over keys, built from prefill queries"),
)}


def names() -> tuple:
    """The registered method names, in a fixed order."""
    return tuple(REGISTRY)


def get(name) -> Method:
    """The :class:`Method` called ``name``; a clear ``ValueError`` for anything else."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"method must be one of {names()}, got {name!r}")
    return REGISTRY[name]


def build(method, keys, values, prefill_queries=None, *, config=None, backend=None, device=None):
    """One layer's index for ``method`` over ``keys, values (Hkv, N, d)``.

    ``prefill_queries (Hq, T, d)`` is passed to every method; only those that learn from them (the
    graph index: RetrievalAttention projects them onto the key graph) use them. ``device``: ``None``
    (infer from the arrays), ``"cpu"`` or ``"cuda"``; ``"full"``, ``"wave"`` and ``"graph"`` (CPU-GPU
    co-execution) run on the GPU, the baselines refuse ``"cuda"`` with a ``ValueError`` that says why.
    """
    m = get(method)
    if config is not None and not isinstance(config, m.config_class):
        raise TypeError(f"method {method!r} takes a {m.config} config, got {type(config).__name__}")
    return m.index_class.build(keys, values, prefill_queries, config=config, backend=backend, device=device)


def default_config(method, n_tokens):
    """The config ``method`` runs with at ``n_tokens`` of context when none is given.

    The papers' defaults, except StreamingLLM, which gets the wave index's exact budget at this
    length (4 sinks + 64 local + 1.8% of the tokens) so that the two are compared at equal reads.
    """
    m = get(method)
    if method == "streaming":
        return m.config_class(n_sink=4, n_recent=64 + int(math.ceil(0.018 * n_tokens)))
    return m.config_class()
