"""LazyAttention on the GPU (arXiv 2606.04302): RoPE applied inside the attention kernel from each document's offset.

Same names, signatures and results as ``reference/lazy.py``. The kernel is the split-K kernel of
:mod:`.attention` over a **paged** pool: one block per (query row, chunk of one document's blocks),
chunks never straddling documents (:func:`retrokv.fast.lazy._chunks`), so a block knows its
document's offset ``S_d`` and one precomputed ``cos``/``sin`` row per document (from
:func:`~retrokv.reference.rope.rope_cos_sin`, the reference's rounding). The physical copy is never
changed or materialised (LazyAttention §3, ``<R(p) q, R(S_d + i) k> = <R(p - S_d) q, R(i) k>``):

* **prefill** (``rotate_keys``): each thread rotates the key it scores by ``+S_d`` in registers,
  ``k' = k cos + sign * k[partner] sin`` (``partner``/``sign`` encode ``rotate_half`` or the
  interleaved pairing), then takes ``q . k'``;
* **decode**: the block de-rotates its query once by ``-S_d`` into shared memory and reads the
  stored keys as they are (cheaper than rotating every key: LazyAttention §4).

Chunk partials are merged by the LSE-merge kernel; the tail (question and generated tokens, causal
in prefill) is the core's ``partial_attention``, merged in by ``merge_partials``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from retrokv.fast.lazy import _chunks, _pairing  # host-side planning: documents cut into chunks, RoPE pairing
from retrokv.reference.rope import rope_cos_sin

from ._xp import MAX_D, MAX_TILE, asnumpy, float_array, geometry, launch, xp
from .attention import merge_chunks, merge_partials, online_softmax_tile, partial_attention
from .rope import apply_rope

__all__ = ["lazy_prefill_attention", "lazy_decode_attention", "materialize", "block_attention"]

NEG_INF = float32(-math.inf)


@cuda.jit
def _lazy_kernel(q, pool_k, pool_v, t_len, g, table, chunk_start, cos, sin, rotate, partner, sign,
                 rotate_keys, scale, block, tile, m_part, l_part, acc_part):
    """Block ``b``: row ``r = b % R`` over chunk ``c = b // R`` of the block table (one document)."""
    q_sh = cuda.shared.array(MAX_D, float32)
    s_sh = cuda.shared.array(MAX_TILE, float32)
    p_sh = cuda.shared.array(MAX_TILE, float32)
    rows, d = q.shape
    dv = pool_v.shape[2]
    r = cuda.blockIdx.x % rows
    c = cuda.blockIdx.x // rows
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = (r // t_len) // g
    doc0 = table[chunk_start[c], 2]
    derotate = (not rotate_keys) and rotate[doc0] != 0
    for x in range(tid, d, nt):                    # decode: R(-S_d) q, once per block
        if derotate:
            q_sh[x] = q[r, x] * cos[doc0, x] + sign[x] * q[r, partner[x]] * sin[doc0, x]
        else:
            q_sh[x] = q[r, x]
    for x in range(tid, dv, nt):
        acc_part[c, r, x] = float32(0.0)
    cuda.syncthreads()
    m = NEG_INF
    l = float32(0.0)
    for e in range(chunk_start[c], chunk_start[c + 1]):
        base = table[e, 0] * block
        doc = table[e, 2]
        rot = rotate_keys and rotate[doc] != 0
        for b0 in range(0, table[e, 1], tile):     # the entry's valid keys, a tile at a time
            nb = min(tile, table[e, 1] - b0)
            for jj in range(tid, nb, nt):
                row = base + b0 + jj
                s = float32(0.0)
                for x in range(d):
                    kx = pool_k[h, row, x]
                    if rot:                        # prefill: R(S_d) k in registers
                        kx = kx * cos[doc, x] + sign[x] * pool_k[h, row, partner[x]] * sin[doc, x]
                    s += q_sh[x] * kx
                s_sh[jj] = s * scale
            cuda.syncthreads()
            m, l = online_softmax_tile(s_sh, p_sh, nb, m, l, pool_v, h, base + b0, acc_part, c, r, tid, nt)
            cuda.syncthreads()
    if tid == 0:
        m_part[c, r] = m
        l_part[c, r] = l


def _documents_part(q3, pool_k, pool_v, table, offsets, block, theta, convention, scale, rotate_keys):
    """``(out (Hq, T, dv), lse (Hq, T))`` of the rows ``q3 (Hq, T, d)`` over every document of the table."""
    m = xp(q3, pool_k)
    hq, t, d = q3.shape
    hkv, dv = pool_k.shape[0], pool_v.shape[2]
    if d > MAX_D:
        raise ValueError(f"head_dim {d} is larger than the CUDA kernels' limit of {MAX_D}")
    rows = m.ascontiguousarray(q3.reshape(hq * t, d))
    table = np.ascontiguousarray(asnumpy(table).astype(np.int64).reshape(-1, 3))
    offsets = asnumpy(offsets).astype(np.int64).reshape(-1)
    chunk_start = _chunks(table, block)
    n_chunks = len(chunk_start) - 1
    m_part = m.full((n_chunks, hq * t), -np.inf, np.float32)
    l_part = m.zeros((n_chunks, hq * t), np.float32)
    acc_part = m.zeros((n_chunks, hq * t, dv), np.float32)
    if n_chunks:
        # prefill rotates keys by +S_d; decode rotates the query by -S_d
        cos, sin = rope_cos_sin(offsets if rotate_keys else -offsets, d, theta, convention)   # (n_docs, d)
        partner, sign = _pairing(d, convention)
        launch(_lazy_kernel, n_chunks * hq * t, rows, pool_k, pool_v, np.int64(t), np.int64(hq // hkv),
               m.asarray(table), m.asarray(chunk_start), m.asarray(cos.reshape(-1, d)), m.asarray(sin.reshape(-1, d)),
               m.asarray((offsets != 0).astype(np.uint8)), m.asarray(partner), m.asarray(sign), bool(rotate_keys),
               np.float32(1.0 / math.sqrt(d) if scale is None else scale), np.int64(block),
               np.int64(geometry().tile), m_part, l_part, acc_part)
    out, lse = merge_chunks(m_part, l_part, acc_part)
    return out.reshape(hq, t, dv), lse.reshape(hq, t)


def lazy_prefill_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                           theta=10000.0, convention="half", scale=None):
    """Same contract as :func:`retrokv.reference.lazy.lazy_prefill_attention`; keys rotated in the kernel."""
    m = xp(q, pool_k, pool_v)
    q = float_array(m, q)
    docs = _documents_part(q, float_array(m, pool_k), float_array(m, pool_v), table, offsets, block, theta,
                           convention, scale, True)
    tail = partial_attention(q, k_tail, v_tail, causal=True, scale=scale)
    return merge_partials([docs, tail])


def lazy_decode_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                          theta=10000.0, convention="half", scale=None):
    """Same contract as :func:`retrokv.reference.lazy.lazy_decode_attention`; the query de-rotated once per document."""
    m = xp(q, pool_k, pool_v)
    q = float_array(m, q)
    out, lse = _documents_part(q[:, None, :], float_array(m, pool_k), float_array(m, pool_v), table, offsets,
                               block, theta, convention, scale, False)
    tail = partial_attention(q, k_tail, v_tail, scale=scale)
    return merge_partials([(out[:, 0], lse[:, 0]), tail])


def materialize(pool_k, pool_v, table, offsets, block=16, theta=10000.0, convention="half"):
    """Same contract as :func:`retrokv.reference.lazy.materialize` (the Block-Attention baseline's copy)."""
    m = xp(pool_k, pool_v)
    table = asnumpy(table).astype(np.int64).reshape(-1, 3)
    hkv, d, dv = pool_k.shape[0], pool_k.shape[2], pool_v.shape[2]
    if len(table) == 0:
        return m.zeros((hkv, 0, d), np.float32), m.zeros((hkv, 0, dv), np.float32)
    lens = table[:, 1]
    rows = np.repeat(table[:, 0] * block - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))   # (L,)
    deltas = np.repeat(asnumpy(offsets).astype(np.int64).reshape(-1)[table[:, 2]], lens)                 # (L,)
    rows = m.asarray(rows)
    k = apply_rope(float_array(m, pool_k)[:, rows], m.asarray(deltas)[None, :], theta, convention)
    return k, float_array(m, pool_v)[:, rows]


def block_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                    theta=10000.0, convention="half", scale=None):
    """Same contract as :func:`retrokv.reference.lazy.block_attention`: materialise, then the core kernel."""
    m = xp(q, pool_k, pool_v)
    k_docs, v_docs = materialize(pool_k, pool_v, table, offsets, block, theta, convention)
    k = m.concatenate([k_docs, float_array(m, k_tail)], axis=1)     # (Hkv, L + M, d)
    v = m.concatenate([v_docs, float_array(m, v_tail)], axis=1)
    return partial_attention(q, k, v, causal=np.ndim(q) == 3, scale=scale)
