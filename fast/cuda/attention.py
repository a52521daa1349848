"""Attention core on the GPU: split-K flash-decoding with a log-sum-exp merge (numba.cuda kernels).

Same names, signatures and results (within float tolerance) as ``reference/attention.py``:
``partial_attention`` returns ``(out, lse)``, ``merge_partials`` combines partials over disjoint key
sets, ``full_attention`` is the output of ``partial_attention``. Shapes: ``q (Hq, d)`` (decode) or
``(Hq, T, d)``, ``k (Hkv, N, d)``, ``v (Hkv, N, dv)``; query head ``h`` reads KV head ``h // G``.

**Split-K (flash-decoding).** One decode query has too little work to fill a GPU if one block reads
a head's whole context, so the keys are cut into ``n_chunks`` chunks and the grid is
``rows x n_chunks`` blocks, one per (query row, key chunk). The row index varies fastest, so the
G query heads of one GQA group and the same chunk are neighbouring blocks and read the same K/V
lines while they are in L2. A block streams its chunk in tiles of ``tile`` keys:

1. the block copies the tile's keys into shared memory as float32: a head's keys are contiguous, so
   consecutive threads read consecutive elements (coalesced); then each thread scores keys of the tile,
   ``s_j = q . k_j * scale``, walking the coordinates from a per-key offset so that the threads of a
   warp read different shared-memory banks;
2. each thread reads the tile's scores, forms the new running max ``m' = max(m, max_j s_j)`` and the
   rescale factor ``alpha = exp(m - m')`` (online softmax: Milakov & Gimelshein; FlashAttention);
3. ``p_j = exp(s_j - m')`` go to shared memory; the running denominator becomes ``l alpha + sum p_j``
   and each thread updates its columns of the accumulator ``acc alpha + sum_j p_j v_j``.

The chunk's partial is ``(m, l, acc)`` (unnormalised), all float32. The merge kernel (one block per
row, threads over ``dv``) combines the chunks exactly as :func:`merge_partials` combines key sets,
the log-sum-exp rule of RetrievalAttention App. B:

    M = max_c m_c,   L = sum_c exp(m_c - M) l_c,   out = sum_c exp(m_c - M) acc_c / L,   lse = M + log L

A chunk with no visible key has ``m = -inf`` and weighs ``exp(-inf) = 0``; if every chunk is empty the
row is ``(0, -inf)``. ``merge_partials`` reuses the same kernel with ``m = lse_i``, ``l = 1``,
``acc = out_i``. Causal blocks (``T > 1``) use the same kernel with a per-row key limit
``N - T + t + 1``: correct, not tuned (each row reads its keys itself; prefill is not the decode path).
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ._xp import MAX_D, MAX_TILE, float_array, geometry, launch, split, xp

__all__ = ["full_attention", "partial_attention", "merge_partials", "attention_partials", "merge_chunks"]

NEG_INF = float32(-math.inf)
K_SH = 8192            # floats of a key tile staged in shared memory (32 KB): tile keys = K_SH // d


@cuda.jit(device=True)
def online_softmax_tile(s_sh, p_sh, nb, m, l, v, h, row0, acc_part, c, r, tid, nt):
    """One tile of the online softmax (flash-decoding): the tile's scores ``s_sh[:nb]`` update the running
    max ``m``, denominator ``l`` and accumulator ``acc_part[c, r]`` with the values ``v[h, row0:row0 + nb]``.
    Returns ``(m, l)``. Every thread of the block calls it (it synchronises)."""
    m_new = m                                      # running max (every thread the same value)
    for jj in range(nb):
        m_new = max(m_new, s_sh[jj])
    alpha = float32(math.exp(m - m_new))           # exp(-inf) = 0 on the first tile
    for jj in range(tid, nb, nt):                  # exp-weights, then denominator and accumulator
        p_sh[jj] = float32(math.exp(s_sh[jj] - m_new))
    cuda.syncthreads()
    total = float32(0.0)
    for jj in range(nb):
        total += p_sh[jj]
    l = l * alpha + total
    for x in range(tid, acc_part.shape[2], nt):
        a = acc_part[c, r, x] * alpha
        for jj in range(nb):                       # consecutive threads read consecutive v columns
            a += p_sh[jj] * float32(v[h, row0 + jj, x])
        acc_part[c, r, x] = a
    return m_new, l


@cuda.jit
def _chunk_kernel(q, k, v, t_len, g, limits, scale, chunk, tile, m_part, l_part, acc_part):
    """Block ``b``: row ``r = b % R`` (query head ``r // T``, position ``r % T``), key chunk ``c = b // R``."""
    q_sh = cuda.shared.array(MAX_D, float32)       # the row's query, read by every key of the chunk
    k_sh = cuda.shared.array(K_SH, float32)        # the tile's keys, row after row
    s_sh = cuda.shared.array(MAX_TILE, float32)    # scores of the current tile
    p_sh = cuda.shared.array(MAX_TILE, float32)    # their exp-weights
    rows, d = q.shape
    dv = v.shape[2]
    r = cuda.blockIdx.x % rows
    c = cuda.blockIdx.x // rows
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    h = (r // t_len) // g                          # the KV head this query head reads (GQA)
    j0 = c * chunk
    j1 = min(j0 + chunk, limits[r])                # causal rows stop at their limit
    for x in range(tid, d, nt):
        q_sh[x] = q[r, x]
    for x in range(tid, dv, nt):                   # each thread owns columns x = tid (mod nt)
        acc_part[c, r, x] = float32(0.0)
    cuda.syncthreads()
    m = NEG_INF
    l = float32(0.0)
    for b0 in range(j0, j1, tile):
        nb = min(tile, j1 - b0)
        for e in range(tid, nb * d, nt):           # 1. stage the tile (coalesced), then score it
            k_sh[e] = float32(k[h, b0 + e // d, e % d])
        cuda.syncthreads()
        for jj in range(tid, nb, nt):
            s = float32(0.0)
            x = jj % d                             # skewed start: no bank conflicts between keys
            for _ in range(d):
                s += q_sh[x] * k_sh[jj * d + x]
                x += 1
                if x == d:
                    x = 0
            s_sh[jj] = s * scale
        cuda.syncthreads()
        m, l = online_softmax_tile(s_sh, p_sh, nb, m, l, v, h, b0, acc_part, c, r, tid, nt)   # 2-3.
        cuda.syncthreads()                         # the next tile overwrites s_sh and p_sh
    if tid == 0:
        m_part[c, r] = m
        l_part[c, r] = l


@cuda.jit
def _merge_kernel(m_part, l_part, acc_part, out, lse):
    """Block ``r``: LSE merge of the ``P`` partials ``(m, l, acc)`` of row ``r``; threads over ``dv``."""
    n_parts = m_part.shape[0]
    dv = acc_part.shape[2]
    r = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    big = NEG_INF
    for c in range(n_parts):
        big = max(big, m_part[c, r])
    if big == NEG_INF:                             # no key anywhere: the merge identity (0, -inf)
        for x in range(tid, dv, nt):
            out[r, x] = float32(0.0)
        if tid == 0:
            lse[r] = NEG_INF
        return
    total = float32(0.0)
    for c in range(n_parts):
        total += float32(math.exp(m_part[c, r] - big)) * l_part[c, r]
    for x in range(tid, dv, nt):
        a = float32(0.0)
        for c in range(n_parts):
            a += float32(math.exp(m_part[c, r] - big)) * acc_part[c, r, x]
        out[r, x] = a / total
    if tid == 0:
        lse[r] = big + float32(math.log(total))


def merge_chunks(m_part, l_part, acc_part):
    """``(out (R, dv), lse (R,))`` from chunk partials ``m, l (P, R)`` and ``acc (P, R, dv)``."""
    xm = xp(m_part, acc_part)
    n_rows, dv = acc_part.shape[1], acc_part.shape[2]
    out = xm.zeros((n_rows, dv), np.float32)
    lse = xm.full(n_rows, -np.inf, np.float32)
    if acc_part.shape[0]:
        launch(_merge_kernel, n_rows, m_part, l_part, acc_part, out, lse)
    return out, lse


def attention_partials(rows, k, v, t_len, g, limits, scale):
    """Chunk partials ``(m, l, acc)`` of query ``rows (R, d)`` over ``k, v``; row ``r`` reads KV head ``(r // t_len) // g``."""
    xm = xp(rows, k, v)
    n_rows, d = rows.shape
    n, dv = k.shape[1], v.shape[2]
    if d > MAX_D:
        raise ValueError(f"head_dim {d} is larger than the CUDA kernels' limit of {MAX_D}")
    n_chunks, chunk = split(n, n_rows)
    m_part = xm.full((n_chunks, n_rows), -np.inf, np.float32)
    l_part = xm.zeros((n_chunks, n_rows), np.float32)
    acc_part = xm.zeros((n_chunks, n_rows, dv), np.float32)
    if n and n_rows:
        launch(_chunk_kernel, n_chunks * n_rows, rows, k, v, np.int64(t_len), np.int64(g), limits,
               np.float32(scale), np.int64(chunk), np.int64(max(1, min(geometry().tile, K_SH // d))),
               m_part, l_part, acc_part)
    return m_part, l_part, acc_part


def partial_attention(q, k, v, causal=False, scale=None):
    """Same contract as :func:`retrokv.reference.attention.partial_attention`; split-K CUDA kernels.

    K and V may be float16 (storage); scores, softmax and accumulation are float32.
    """
    xm = xp(q, k, v)
    q = float_array(xm, q)
    k = float_array(xm, k, keep_half=True)
    v = float_array(xm, v, keep_half=True)
    decode = q.ndim == 2
    q3 = q[:, None, :] if decode else q                        # (Hq, T, d)
    hq, t, d = q3.shape
    hkv, n, dv = v.shape
    g = hq // hkv
    rows = xm.ascontiguousarray(q3.reshape(hq * t, d))         # (Hq*T, d), row = h*T + t
    if causal and not decode:
        limits = n - t + 1 + xm.arange(hq * t, dtype=np.int64) % t    # query t sees keys < N - T + t + 1
    else:
        limits = xm.full(hq * t, n, np.int64)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = merge_chunks(*attention_partials(rows, k, v, t, g, limits, scale))
    out, lse = out.reshape(hq, t, dv), lse.reshape(hq, t)
    if decode:
        return out[:, 0], lse[:, 0]
    return out, lse


def full_attention(q, k, v, causal=False, scale=None):
    """Same contract as :func:`retrokv.reference.attention.full_attention`."""
    return partial_attention(q, k, v, causal=causal, scale=scale)[0]


def merge_partials(parts):
    """Same contract as :func:`retrokv.reference.attention.merge_partials`; the chunk-merge kernel."""
    parts = list(parts)
    xm = xp(*[a for part in parts for a in part])
    outs = xm.stack([float_array(xm, o) for o, _ in parts])   # (P, ..., dv)
    lses = xm.stack([float_array(xm, l) for _, l in parts])   # (P, ...)
    n_parts, dv = outs.shape[0], outs.shape[-1]
    lead = lses.shape[1:]
    n_rows = int(np.prod(lead)) if lead else 1
    m_part = xm.ascontiguousarray(lses.reshape(n_parts, n_rows))
    out, lse = merge_chunks(m_part, xm.ones_like(m_part), xm.ascontiguousarray(outs.reshape(n_parts, n_rows, dv)))
    return out.reshape(lead + (dv,)), lse.reshape(lead)
