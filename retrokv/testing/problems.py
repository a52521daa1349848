"""The problems the strategies draw: small frozen dataclasses with a repr a person can read.

They hold NumPy arrays, so they compare by identity (``eq=False``); the repr shows shapes, the value
regime and a few statistics that explain why a case is hard (score range, which keys dominate)
instead of thousands of numbers. Importable without hypothesis (the real-data sample uses them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GQAShape", "AttentionProblem", "RopeProblem", "MethodProblem", "LazyProblem"]


def _shape(x):
    return "x".join(str(s) for s in np.shape(x))


def _repr_pretty_(self, printer, cycle):
    """IPython's pretty-printing hook, which hypothesis uses for falsifying examples: show our short repr,
    not every array element."""
    printer.text(repr(self))


@dataclass(frozen=True)
class GQAShape:
    """Head counts and sizes: ``Hq = Hkv * G`` query heads, ``N`` keys of width ``d``, values of width
    ``dv``; ``T`` queries per head (``None``: one decode query, ``q (Hq, d)``)."""

    hq: int
    hkv: int
    n: int
    d: int
    dv: int
    t: int | None = None

    @property
    def group(self):
        return self.hq // self.hkv

    @property
    def q_shape(self):
        return (self.hq, self.d) if self.t is None else (self.hq, self.t, self.d)


@dataclass(frozen=True, eq=False)
class AttentionProblem:
    """``q (Hq, [T,] d)``, ``k (Hkv, N, d)``, ``v (Hkv, N, dv)`` float32, with ``causal`` and ``scale``
    (``None``: ``1/sqrt(d)``) as :func:`retrokv.full_attention` takes them; ``regime`` names how the
    values were drawn."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    causal: bool = False
    scale: float | None = None
    regime: str = "gaussian"

    @property
    def shape(self) -> GQAShape:
        t = None if self.q.ndim == 2 else self.q.shape[1]
        return GQAShape(self.q.shape[0], self.k.shape[0], self.k.shape[1], self.k.shape[2], self.v.shape[2], t)

    @property
    def kwargs(self):
        """``dict(causal=..., scale=...)`` to splat into an attention call or the assertion."""
        return {"causal": self.causal, "scale": self.scale}

    def score_range(self):
        """``(min, max)`` of the scaled scores ``q.k * scale`` (``(0, 0)`` with no keys)."""
        s = self.scores()
        return (float(s.min()), float(s.max())) if s.size else (0.0, 0.0)

    def scores(self):
        """Scaled scores ``(Hq, T, N)`` in float64 (no causal mask)."""
        g = self.q.shape[0] // self.k.shape[0]
        q3 = self.q[:, None] if self.q.ndim == 2 else self.q
        k = np.repeat(self.k.astype(np.float64), g, axis=0)                   # (Hq, N, d)
        scale = 1 / np.sqrt(self.q.shape[-1]) if self.scale is None else self.scale
        return np.einsum("htd,hnd->htn", q3.astype(np.float64), k) * scale

    def __repr__(self):
        s = self.shape
        lo, hi = self.score_range()
        t = "decode" if s.t is None else f"T={s.t}{' causal' if self.causal else ''}"
        return (f"AttentionProblem({self.regime}: Hq={s.hq} Hkv={s.hkv} N={s.n} d={s.d} dv={s.dv} {t}, "
                f"scale={'1/sqrt(d)' if self.scale is None else f'{self.scale:.4g}'}, "
                f"scores in [{lo:.3g}, {hi:.3g}], |v| <= {float(np.abs(self.v).max(initial=0)):.3g})")

    _repr_pretty_ = _repr_pretty_


@dataclass(frozen=True, eq=False)
class RopeProblem:
    """``x (..., d)`` float32 vectors, integer ``positions`` (broadcastable to ``x.shape[:-1]``), a shift
    ``delta`` for composition checks, RoPE ``theta`` and ``convention`` (``"half"`` | ``"interleaved"``)."""

    x: np.ndarray
    positions: np.ndarray
    delta: int
    theta: float
    convention: str

    def __repr__(self):
        p = np.asarray(self.positions)
        return (f"RopeProblem(x {_shape(self.x)}, positions {int(p.min())}..{int(p.max())}, delta={self.delta}, "
                f"theta={self.theta:g}, convention={self.convention!r})")

    _repr_pretty_ = _repr_pretty_


@dataclass(frozen=True, eq=False)
class MethodProblem:
    """A decode step for one sparse method: ``method`` (``"wave"``, ``"topk"``, ``"streaming"``,
    ``"quest"``, ``"ivf"``, ``"graph"``), its ``config`` object, ``q (Hq, d)``, ``k, v (Hkv, N, d)`` and,
    for ``"graph"``, ``prefill_queries (Hq, Tq, d)``. :func:`retrokv.testing.oracles.method_reference`
    gives retrokv's output for it."""

    method: str
    config: Any
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    prefill_queries: np.ndarray | None = None
    regime: str = "gaussian"

    def __repr__(self):
        pq = "" if self.prefill_queries is None else f", prefill_queries {_shape(self.prefill_queries)}"
        return (f"MethodProblem({self.method}, {self.regime}: q {_shape(self.q)}, k {_shape(self.k)}, "
                f"v {_shape(self.v)}{pq}, config={self.config!r})")

    _repr_pretty_ = _repr_pretty_


@dataclass(frozen=True, eq=False)
class LazyProblem:
    """A LazyAttention request: ``documents`` as ``(keys, values)`` pairs ``(Hkv, L, d)`` with keys
    rotated to document-local positions ``0..L-1``; the tail ``k_tail, v_tail (Hkv, M, d)`` and ``q``
    (``(Hq, d)`` decode or ``(Hq, T, d)`` the last T tail tokens) at logical positions starting at
    ``start + sum(L)``; ``config`` a :class:`retrokv.LazyConfig`. Arguments of
    :func:`retrokv.testing.oracles.lazy_reference`."""

    documents: tuple
    k_tail: np.ndarray
    v_tail: np.ndarray
    q: np.ndarray
    start: int
    config: Any

    def __repr__(self):
        lengths = [int(k.shape[1]) for k, _ in self.documents]
        return (f"LazyProblem(documents of lengths {lengths} from position {self.start}, tail {_shape(self.k_tail)}, "
                f"q {_shape(self.q)}, config={self.config!r})")

    _repr_pretty_ = _repr_pretty_
