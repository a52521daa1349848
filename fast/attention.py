"""Attention core, fast path: Numba kernels with the same names and results as ``reference/attention.py``.

The kernel is flash-decoding on the CPU. The work is cut into items ``(KV head, tile of query rows,
chunk of keys)`` that run in parallel threads; each item streams its keys in blocks: one small GEMM
(BLAS, through Numba's ``np.dot``) scores the block against every query row of the tile (all G query
heads of a GQA group, and T positions), a scalar pass keeps the running max and denominator (online
softmax), and a second GEMM adds ``P @ V`` to the running weighted value sum. The per-chunk
partials are then merged with the same log-sum-exp rule as :func:`merge_partials`
(RetrievalAttention App. B). For one decode step the rows are the G heads of a group, so K and V
are read from memory exactly once: the kernel is bandwidth-bound, as decode attention should be.
Calls below :data:`~retrokv.fast._dispatch.PARALLEL_MIN_WORK` multiply-adds (a short static window,
a small decode step) run on one thread (:func:`~retrokv.fast._dispatch.threads_for`).
"""
from __future__ import annotations

import math
import os

import numba as nb
import numpy as np

from ._dispatch import any_cupy, cuda, require_numpy, threads_for

__all__ = ["full_attention", "partial_attention", "merge_partials"]

_ROW_TILE = 128         # query rows handled by one work item (all G heads x T positions of a tile)
_KEY_BLOCK = 1024       # keys per block: one small GEMM for the scores and one for P @ V
_MIN_CHUNK = 4096       # keys per work item, at least (amortises the per-item set-up)
_FLAGS = {"reassoc", "contract", "nsz", "arcp", "afn"}   # keep inf/nan semantics: the mask uses -inf


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def _attention_chunks(q, k, v, limits, scale, n_tiles, n_chunks, chunk):
    hkv, rows, d = q.shape
    dv = v.shape[2]
    m_part = np.full((hkv, n_chunks, rows), -np.inf, dtype=np.float32)
    l_part = np.zeros((hkv, n_chunks, rows), dtype=np.float32)
    acc_part = np.zeros((hkv, n_chunks, rows, dv), dtype=np.float32)
    for item in nb.prange(hkv * n_tiles * n_chunks):
        h = item // (n_tiles * n_chunks)
        r0 = ((item // n_chunks) % n_tiles) * _ROW_TILE
        c = item % n_chunks
        r1 = min(r0 + _ROW_TILE, rows)
        nr = r1 - r0
        j0 = c * chunk
        j1 = min(j0 + chunk, k.shape[1], limits[r0:r1].max())   # keys past every row's limit are never read
        q_t = np.ascontiguousarray(q[h, r0:r1].T) * scale        # (d, nr)
        m = np.full(nr, -np.inf, dtype=np.float32)
        l = np.zeros(nr, dtype=np.float32)
        acc = np.zeros((nr, dv), dtype=np.float32)
        for b0 in range(j0, j1, _KEY_BLOCK):
            b1 = min(b0 + _KEY_BLOCK, j1)
            s = np.dot(k[h, b0:b1], q_t)                         # (nb, nr) scores, one GEMM
            p = np.zeros((nr, b1 - b0), dtype=np.float32)       # (nr, nb) exp-weights
            for r in range(nr):
                end = min(b1, limits[r0 + r]) - b0               # keys this row may see in the block
                if end <= 0:
                    continue
                mb = m[r]
                for jj in range(end):
                    mb = max(mb, s[jj, r])
                alpha = np.float32(math.exp(m[r] - mb))          # rescale what came before (online softmax)
                l[r] *= alpha
                for x in range(dv):
                    acc[r, x] *= alpha
                total = np.float32(0.0)
                for jj in range(end):
                    e = np.float32(math.exp(s[jj, r] - mb))
                    p[r, jj] = e
                    total += e
                l[r] += total
                m[r] = mb
            acc += np.dot(p, v[h, b0:b1])                         # (nr, dv), one GEMM
        m_part[h, c, r0:r1] = m
        l_part[h, c, r0:r1] = l
        acc_part[h, c, r0:r1] = acc
    return m_part, l_part, acc_part


@nb.njit(cache=True)
def _merge_row(m_part, l_part, acc_part, h, r, out, lse):
    """Row ``(h, r)`` of :func:`_merge_chunks`: its chunks' partials merged by log-sum-exp."""
    n_chunks, dv = acc_part.shape[1], acc_part.shape[3]
    m = np.float32(-np.inf)
    nan = False
    for c in range(n_chunks):
        m = max(m, m_part[h, c, r])
        # max() drops NaN, and a row whose every score is NaN keeps m = -inf with l = NaN: look
        # for NaN explicitly so that NaN inputs (check_finite=False) give NaN, as in the reference
        nan = nan or m_part[h, c, r] != m_part[h, c, r] or l_part[h, c, r] != l_part[h, c, r]
    if nan:
        for x in range(dv):
            out[h, r, x] = np.nan
        lse[h, r] = np.nan
        return
    if m == -np.inf:
        return                            # no key visible: (0, -inf), the merge identity
    total = np.float32(0.0)
    for c in range(n_chunks):
        w = np.float32(math.exp(m_part[h, c, r] - m))
        total += w * l_part[h, c, r]
        for x in range(dv):
            out[h, r, x] += w * acc_part[h, c, r, x]
    for x in range(dv):
        out[h, r, x] /= total
    lse[h, r] = m + np.float32(math.log(total))


@nb.njit(parallel=True, cache=True)
def _merge_chunks(m_part, l_part, acc_part):
    hkv, n_chunks, rows, dv = acc_part.shape
    out = np.zeros((hkv, rows, dv), dtype=np.float32)
    lse = np.full((hkv, rows), -np.inf, dtype=np.float32)
    for item in nb.prange(hkv * rows):
        _merge_row(m_part, l_part, acc_part, item // rows, item % rows, out, lse)
    return out, lse


@nb.njit(cache=True)
def _merge_pair(o1, l1, o2, l2):
    """:func:`merge_partials` of two ``(rows, dv)`` partials in one serial call (a decode step's exact
    and estimated zones): the same per-row arithmetic as :func:`_merge_chunks`."""
    rows, dv = o1.shape
    m_part = np.empty((1, 2, rows), dtype=np.float32)
    m_part[0, 0], m_part[0, 1] = l1, l2
    acc = np.empty((1, 2, rows, dv), dtype=np.float32)
    acc[0, 0], acc[0, 1] = o1, o2
    ones = np.ones((1, 2, rows), dtype=np.float32)
    out = np.zeros((1, rows, dv), dtype=np.float32)
    lse = np.full((1, rows), -np.inf, dtype=np.float32)
    for r in range(rows):
        _merge_row(m_part, ones, acc, 0, r, out, lse)
    return out[0], lse[0]


def _plan(hkv, rows, n):
    """Pick the key-chunk length so that there are a few work items per thread."""
    n_tiles = -(-rows // _ROW_TILE)
    want = max(1, 4 * nb.get_num_threads() // max(1, hkv * n_tiles))
    n_chunks = max(1, min(want, -(-n // _MIN_CHUNK)))
    chunk = max(1, -(-n // n_chunks))
    return n_tiles, n_chunks, chunk


def partial_attention(q, k, v, causal=False, scale=None):
    """Same contract as :func:`retrokv.reference.attention.partial_attention`; Numba kernel (CUDA for CuPy input)."""
    if any_cupy(q, k, v):
        return cuda("attention").partial_attention(q, k, v, causal=causal, scale=scale)
    require_numpy("partial_attention", q, k, v)
    q = np.asarray(q, dtype=np.float32)
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    decode = q.ndim == 2
    q3 = q[:, None, :] if decode else q                       # (Hq, T, d)
    hq, t, d = q3.shape
    hkv, n, dv = v.shape
    g = hq // hkv
    rows = np.ascontiguousarray(q3.reshape(hkv, g * t, d))     # (Hkv, G*T, d), row = g*T + t
    if causal and not decode:
        limits = np.tile(np.arange(n - t + 1, n + 1, dtype=np.int64), g)   # (G*T,)
    else:
        limits = np.full(g * t, n, dtype=np.int64)
    scale = np.float32(1.0 / math.sqrt(d) if scale is None else scale)
    with threads_for(hkv * g * t * n * (d + dv)):              # a small call (a decode step) runs on one thread
        n_tiles, n_chunks, chunk = _plan(hkv, g * t, n)
        parts = _attention_chunks(rows, k, v, limits, scale, n_tiles, n_chunks, chunk)
        out, lse = _merge_chunks(*parts)                       # (Hkv, G*T, dv), (Hkv, G*T)
    out = out.reshape(hq, t, dv)
    lse = lse.reshape(hq, t)
    if decode:
        return out[:, 0], lse[:, 0]
    return out, lse


def full_attention(q, k, v, causal=False, scale=None):
    """Same contract as :func:`retrokv.reference.attention.full_attention`; Numba kernel."""
    return partial_attention(q, k, v, causal=causal, scale=scale)[0]


def merge_partials(parts):
    """Same contract as :func:`retrokv.reference.attention.merge_partials`; one pass over the parts."""
    parts = list(parts)
    if any_cupy(*[a for part in parts for a in part]):
        return cuda("attention").merge_partials(parts)
    require_numpy("merge_partials", *[o for o, _ in parts])
    outs = np.ascontiguousarray(np.stack([np.asarray(o, np.float32) for o, _ in parts]))   # (P, ..., dv)
    lses = np.ascontiguousarray(np.stack([np.asarray(l, np.float32) for _, l in parts]))   # (P, ...)
    p, dv = outs.shape[0], outs.shape[-1]
    lead = lses.shape[1:]
    rows = int(np.prod(lead)) if lead else 1
    # reuse the chunk merge: parts play the role of key chunks of one "head"
    m_part = lses.reshape(p, rows).T.reshape(1, rows, p).transpose(0, 2, 1)
    with threads_for(p * rows * dv):
        out, lse = _merge_chunks(np.ascontiguousarray(m_part, dtype=np.float32),
                                 np.ascontiguousarray(np.ones_like(m_part)),
                                 np.ascontiguousarray(outs.reshape(1, p, rows, dv)))
    return out.reshape(lead + (dv,)), lse.reshape(lead)
