"""The one interface every decode-time index implements, and the one statistics record they all fill.

A *decode index* holds one layer's KV cache of one sequence, ``keys (Hkv, N, d)`` and
``values (Hkv, N, dv)``, and answers one decode query at a time by reading only part of it
(docs/index.md, "Architecture")::

    index = Index.build(keys, values, prefill_queries=None, config=None, backend=None)
    out = index.attend(q)                       # q (Hq, d) -> (Hq, dv); return_lse=True adds lse (Hq,)
    index.append(k, v)                          # (Hkv, d) one token, or (Hkv, n, d) n tokens
    ids, n_scanned = index.search(q, k=100)     # where the method retrieves keys (not StreamingLLM, wave, dense)
    index.last_stats                            # an IndexStats (or a subclass with the method's own detail)

Dense attention, StreamingLLM, exact top-k, IVF, Quest (:mod:`retrokv.dense`, :mod:`retrokv.baselines`),
RetroInfer's wave index (:mod:`retrokv.wave_index`) and RetrievalAttention's graph index
(:mod:`retrokv.graph_index`) all implement :class:`DecodeIndex`; :mod:`retrokv.methods` maps their
names to their classes, and :mod:`retrokv.hf` only talks to this interface.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["IndexStats", "DecodeIndex", "resolve_config", "check_prefill_queries"]

_FIELDS: dict = {}     # stats class -> its field names (scalars() runs every decode step of every layer)


@dataclass(frozen=True, kw_only=True)
class IndexStats:
    """What one ``attend`` did. The same fields, with the same meaning, for every decode index.

    Counts are summed over the query heads (a GQA group's heads each count their own work), so
    ``tokens_attended = Hq * n_tokens`` for dense attention.

    Attributes:
        n_tokens: context length at this step.
        tokens_attended: (query head, token) pairs whose key and value entered exact attention.
        keys_scored: key vectors whose inner product with the query was computed to *choose* what
            to attend (exact top-k scores every indexed key; a graph search the keys it visits).
        meta_scored: other vectors scored to choose: IVF/wave centroids, Quest page bounds (a page
            counts two: min and max).
        bytes_read: float32 bytes of KV and metadata read this step (how each method counts is in
            its module docstring).
        density: ``tokens_attended / (Hq * n_tokens)``, the fraction of the context read exactly.
        zones: tokens per zone, summed over query heads, for methods with zones (e.g. the wave
            index's ``steady``, ``retrieval``, ``estimation``, ``dropped``; a retrieval index's
            ``static`` and ``retrieved``).
    """

    n_tokens: int
    tokens_attended: int
    keys_scored: int
    meta_scored: int
    bytes_read: int
    density: float
    zones: dict = field(default_factory=dict)

    def scalars(self) -> dict:
        """Every numeric scalar field, zones flattened as ``zone_<name>``: what the hf handle aggregates."""
        out = {}
        names = _FIELDS.get(type(self))
        if names is None:
            names = _FIELDS[type(self)] = tuple(f.name for f in dataclasses.fields(self))
        for name in names:
            x = getattr(self, name)
            if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_)):
                out[name] = float(x) if isinstance(x, (float, np.floating)) else int(x)
        out.update({f"zone_{k}": int(v) for k, v in self.zones.items()})
        return out

    def as_dict(self) -> dict:
        """All fields, arrays included."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@runtime_checkable
class DecodeIndex(Protocol):
    """The decode-time index interface (see the module docstring). ``tests/test_index_interface.py``
    checks that every registered method's class satisfies it, signatures included."""

    config: Any
    backend: str
    last_stats: IndexStats | None

    @classmethod
    def build(cls, keys, values, prefill_queries=None, *, config=None, backend=None, device=None, **overrides):
        """Index one layer's ``keys (Hkv, N, d)`` and ``values (Hkv, N, dv)``; ``device``: ``None`` (infer from
        the arrays), ``"cpu"`` or ``"cuda"`` (a class without a GPU path raises ``ValueError``)."""

    @property
    def n_tokens(self) -> int:
        """Tokens held: the prompt plus every appended token."""

    def append(self, k, v) -> None:
        """Add generated tokens: ``(Hkv, d)`` for one, ``(Hkv, n, d)`` for ``n``."""

    def attend(self, q, return_lse=False):
        """One decode step: ``q (Hq, d) -> out (Hq, dv)`` (and ``lse (Hq,)``); sets ``last_stats``."""


def resolve_config(cls, config, overrides):
    """``config`` (default ``cls()``) with keyword ``overrides`` of its fields, validated by ``cls``."""
    if config is None:
        config = cls()
    elif not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    if overrides:
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown {cls.__name__} field(s) {bad}; expected some of {sorted(names)}")
        config = dataclasses.replace(config, **overrides)
    return config


def check_prefill_queries(prefill_queries, cls_name):
    """Refuse a config passed where ``prefill_queries`` goes (the third positional argument of every
    ``build``): ``WaveIndex.build(k, v, WaveConfig(...))`` must not silently ignore the config."""
    if prefill_queries is not None and dataclasses.is_dataclass(prefill_queries):
        raise TypeError(f"{cls_name}.build got a {type(prefill_queries).__name__} as prefill_queries (the third "
                        f"positional argument); pass the config by keyword: build(keys, values, config=...)")
    return prefill_queries
