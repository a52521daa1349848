"""LazyAttention, fast path: one Numba kernel that re-positions document keys inside the attention loop.

Same names, signatures and results as ``reference/lazy.py``. The kernel is the attention core's
flash-decoding loop (``fast/attention.py``) over a **paged** pool: work items are ``(KV head, tile of
query rows, chunk of one document's blocks)``. In prefill mode each 16-token K block is rotated by
its document's offset into a per-thread scratch of ``B x d`` floats and then read by every query row
of the tile, so the rotation costs ``~3 d`` flops per key against ``~4 d`` per key *per row* for the
attention itself (LazyAttention §4: prefill overhead ``~3 / (4 M)``). In decode mode the item's
query rows are de-rotated once by ``-offset`` and the stored keys are read as they are. Chunk
partials are merged by the core's LSE merge (``_merge_chunks``), and the question's own causal part
by :func:`retrokv.fast.attention.partial_attention` and :func:`merge_partials`.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from retrokv.reference.rope import rope_cos_sin

from ._dispatch import any_cupy, cuda, require_numpy
from .attention import _merge_chunks, merge_partials, partial_attention
from .rope import apply_rope

__all__ = ["lazy_prefill_attention", "lazy_decode_attention", "materialize", "block_attention"]

_CHUNK_KEYS = 1024      # keys per work item at most (several items per document when long)
_ROW_TILE = 32          # query rows sharing one rotated K block (kept here: Numba freezes globals in its cache)
_FLAGS = {"reassoc", "contract", "nsz", "arcp"}   # vectorise the dots; keep -inf semantics


@nb.njit(cache=True, fastmath=_FLAGS)
def _rotate_rows(src, base, n, cos, sin, partner, sign, dst):
    """dst[j] = RoPE(src[base + j]) for j < n: ``x * cos + sign * x[partner] * sin``.

    The half-split convention (HF Llama) is written as two contiguous half loops so that they vectorise;
    the interleaved one goes through the partner table.
    """
    d = src.shape[1]
    half = d // 2
    if partner[0] == half:                                   # rotate_half pairing
        for j in range(n):
            for x in range(half):
                a = src[base + j, x]
                b = src[base + j, x + half]
                dst[j, x] = a * cos[x] - b * sin[x]
                dst[j, x + half] = b * cos[x + half] + a * sin[x + half]
    else:
        for j in range(n):
            for x in range(d):
                dst[j, x] = src[base + j, x] * cos[x] + sign[x] * src[base + j, partner[x]] * sin[x]


@nb.njit(parallel=True, cache=True, fastmath=_FLAGS)
def _lazy_chunks(q, pool_k, pool_v, table, chunk_start, cos, sin, rotate, partner, sign,
                 scale, block, n_tiles, rotate_keys):
    """Online-softmax partials ``(m, l, acc)`` per (KV head, chunk, row), as the core's ``_attention_chunks``."""
    hkv, rows, d = q.shape
    dv = pool_v.shape[2]
    n_chunks = chunk_start.shape[0] - 1
    m_part = np.full((hkv, n_chunks, rows), -np.inf, dtype=np.float32)
    l_part = np.zeros((hkv, n_chunks, rows), dtype=np.float32)
    acc_part = np.zeros((hkv, n_chunks, rows, dv), dtype=np.float32)
    for item in nb.prange(hkv * n_tiles * n_chunks):
        h = item // (n_tiles * n_chunks)
        rest = item % (n_tiles * n_chunks)
        r0 = (rest // n_chunks) * _ROW_TILE
        c = rest % n_chunks
        nr = min(r0 + _ROW_TILE, rows) - r0
        kbuf = np.empty((block, d), dtype=np.float32)           # one rotated K block (prefill)
        qbuf = np.empty((_ROW_TILE, d), dtype=np.float32)       # the tile's queries (de-rotated in decode)
        s = np.empty(block, dtype=np.float32)
        m = np.full(_ROW_TILE, -np.inf, dtype=np.float32)
        l = np.zeros(_ROW_TILE, dtype=np.float32)
        acc = acc_part[h, c]
        doc0 = table[chunk_start[c], 2]                          # a chunk lies inside one document
        if not rotate_keys and rotate[doc0]:
            _rotate_rows(q[h], r0, nr, cos[doc0], sin[doc0], partner, sign, qbuf)
        else:
            for r in range(nr):
                for x in range(d):
                    qbuf[r, x] = q[h, r0 + r, x]
        for e in range(chunk_start[c], chunk_start[c + 1]):
            base = table[e, 0] * block
            n = table[e, 1]
            doc = table[e, 2]
            if rotate_keys and rotate[doc]:
                _rotate_rows(pool_k[h], base, n, cos[doc], sin[doc], partner, sign, kbuf)
                kb, kbase = kbuf, 0
            else:
                kb, kbase = pool_k[h], base
            for r in range(nr):
                mb = np.float32(-np.inf)
                for j in range(n):
                    dot = np.float32(0.0)
                    for x in range(d):
                        dot += qbuf[r, x] * kb[kbase + j, x]
                    dot *= scale
                    s[j] = dot
                    mb = max(mb, dot)
                m_new = max(m[r], mb)
                alpha = np.float32(math.exp(m[r] - m_new))
                l[r] *= alpha
                for x in range(dv):
                    acc[r0 + r, x] *= alpha
                for j in range(n):
                    p = np.float32(math.exp(s[j] - m_new))
                    l[r] += p
                    for x in range(dv):
                        acc[r0 + r, x] += p * pool_v[h, base + j, x]
                m[r] = m_new
        for r in range(nr):
            m_part[h, c, r0 + r] = m[r]
            l_part[h, c, r0 + r] = l[r]
    return m_part, l_part, acc_part


def _pairing(d, convention):
    """Partner index and sign so that RoPE is ``x * cos + sign * x[partner] * sin`` (rotate_half or pairs)."""
    idx = np.arange(d)
    if convention == "half":
        partner = (idx + d // 2) % d
        sign = np.where(idx < d // 2, -1.0, 1.0)
    else:
        partner = idx ^ 1
        sign = np.where(idx % 2 == 0, -1.0, 1.0)
    return partner.astype(np.int64), sign.astype(np.float32)


def _chunks(table, block):
    """Cut the block table into work chunks of at most ``_CHUNK_KEYS`` keys that never straddle documents."""
    n = len(table)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    idx = np.arange(n)
    doc = table[:, 2]
    new_doc = np.r_[True, doc[1:] != doc[:-1]]
    first = np.maximum.accumulate(np.where(new_doc, idx, 0))           # index of the document's first block
    boundary = (idx - first) % max(1, _CHUNK_KEYS // block) == 0
    return np.r_[np.flatnonzero(boundary), n].astype(np.int64)


def _documents_part(q3, pool_k, pool_v, table, offsets, block, theta, convention, scale, rotate_keys):
    """(out, lse) of the query rows ``q3 (Hq, T, d)`` over every document of the block table."""
    hq, t, d = q3.shape
    hkv, dv = pool_k.shape[0], pool_v.shape[2]
    g = hq // hkv
    rows = np.ascontiguousarray(q3.reshape(hkv, g * t, d), dtype=np.float32)   # (Hkv, G*T, d)
    table = np.ascontiguousarray(np.asarray(table, dtype=np.int64).reshape(-1, 3))
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    # prefill rotates keys by +S_d; decode rotates the query by -S_d (same cos, negated sin)
    cos, sin = rope_cos_sin(offsets if rotate_keys else -offsets, d, theta, convention)   # (n_docs, d)
    partner, sign = _pairing(d, convention)
    chunk_start = _chunks(table, block)
    n_tiles = -(-(g * t) // _ROW_TILE)
    parts = _lazy_chunks(rows, pool_k, pool_v, table, chunk_start,
                         np.ascontiguousarray(cos.reshape(-1, d)), np.ascontiguousarray(sin.reshape(-1, d)),
                         (offsets != 0).astype(np.uint8), partner, sign,
                         np.float32(1.0 / math.sqrt(d) if scale is None else scale),
                         np.int64(block), np.int64(n_tiles), rotate_keys)
    out, lse = _merge_chunks(*parts)                                    # (Hkv, G*T, dv), (Hkv, G*T)
    return out.reshape(hq, t, dv), lse.reshape(hq, t)


def _pool(pool_k, pool_v):
    return (np.ascontiguousarray(pool_k, dtype=np.float32), np.ascontiguousarray(pool_v, dtype=np.float32))


def lazy_prefill_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                           theta=10000.0, convention="half", scale=None):
    """Same contract as :func:`retrokv.reference.lazy.lazy_prefill_attention`; fused Numba kernel (CUDA for CuPy)."""
    if any_cupy(q, k_tail, v_tail, pool_k, pool_v):
        return cuda("lazy").lazy_prefill_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block,
                                                   theta, convention, scale)
    require_numpy("lazy_prefill_attention", q, k_tail, v_tail, pool_k, pool_v)
    pool_k, pool_v = _pool(pool_k, pool_v)
    q = np.asarray(q, dtype=np.float32)
    docs = _documents_part(q, pool_k, pool_v, table, offsets, block, theta, convention, scale, True)
    tail = partial_attention(q, k_tail, v_tail, causal=True, scale=scale)
    return merge_partials([docs, tail])


def lazy_decode_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                          theta=10000.0, convention="half", scale=None):
    """Same contract as :func:`retrokv.reference.lazy.lazy_decode_attention`; fused Numba kernel (CUDA for CuPy)."""
    if any_cupy(q, k_tail, v_tail, pool_k, pool_v):
        return cuda("lazy").lazy_decode_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block,
                                                  theta, convention, scale)
    require_numpy("lazy_decode_attention", q, k_tail, v_tail, pool_k, pool_v)
    pool_k, pool_v = _pool(pool_k, pool_v)
    q = np.asarray(q, dtype=np.float32)
    out, lse = _documents_part(q[:, None, :], pool_k, pool_v, table, offsets, block, theta, convention,
                               scale, False)
    tail = partial_attention(q, k_tail, v_tail, scale=scale)
    return merge_partials([(out[:, 0], lse[:, 0]), tail])


def materialize(pool_k, pool_v, table, offsets, block=16, theta=10000.0, convention="half"):
    """Same contract as :func:`retrokv.reference.lazy.materialize`: a NumPy gather, then the fast RoPE kernel."""
    if any_cupy(pool_k, pool_v):
        return cuda("lazy").materialize(pool_k, pool_v, table, offsets, block, theta, convention)
    require_numpy("materialize", pool_k, pool_v)
    table = np.asarray(table, dtype=np.int64).reshape(-1, 3)
    hkv, d, dv = pool_k.shape[0], pool_k.shape[2], pool_v.shape[2]
    if len(table) == 0:
        return np.zeros((hkv, 0, d), np.float32), np.zeros((hkv, 0, dv), np.float32)
    lens = table[:, 1]
    # pool row of every token, in logical order, and the offset its document moves by
    first = np.repeat(table[:, 0] * block - np.cumsum(lens) + lens, lens)
    rows = first + np.arange(int(lens.sum()))                                        # (L,)
    deltas = np.repeat(np.asarray(offsets, dtype=np.int64)[table[:, 2]], lens)        # (L,)
    k = apply_rope(np.ascontiguousarray(pool_k[:, rows], dtype=np.float32), deltas[None, :], theta, convention)
    return k, np.ascontiguousarray(pool_v[:, rows], dtype=np.float32)


def block_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                    theta=10000.0, convention="half", scale=None):
    """Same contract as :func:`retrokv.reference.lazy.block_attention`; materialise, then the core kernel."""
    if any_cupy(q, k_tail, v_tail, pool_k, pool_v):
        return cuda("lazy").block_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block, theta,
                                            convention, scale)
    require_numpy("block_attention", q, k_tail, v_tail, pool_k, pool_v)
    k_docs, v_docs = materialize(pool_k, pool_v, table, offsets, block, theta, convention)
    k = np.concatenate([k_docs, np.asarray(k_tail, np.float32)], axis=1)     # (Hkv, L + M, d)
    v = np.concatenate([v_docs, np.asarray(v_tail, np.float32)], axis=1)
    return partial_attention(q, k, v, causal=np.ndim(q) == 3, scale=scale)
