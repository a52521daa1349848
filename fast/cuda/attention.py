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

**GQA-grouped decode (``_group_kernel``).** With ``T = 1`` and one key limit per GQA group (decode, and
the execution buffer of ``wave_index.attend_execution_buffer``), the per-row kernel would have the G
blocks of a group read the same K/V chunk, G times the bytes from L2/HBM. The group kernel runs one
block per (KV head, key chunk) instead and serves the group's G query rows from one read of each K/V
element (the grouping of flash-decoding for GQA); its partials have the layout above, so the merge is
unchanged. Causal blocks, groups whose rows stop at different keys, and groups too large for its
shared memory or registers keep ``_chunk_kernel``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ._lanes import lanes
from ._xp import MAX_D, MAX_TILE, float_array, geometry, launch, split, xp

__all__ = ["full_attention", "partial_attention", "merge_partials", "attention_partials", "merge_chunks"]

NEG_INF = float32(-math.inf)
K_SH = 8192            # floats of a key tile staged in shared memory (32 KB): tile keys = K_SH // d
# The group kernel's static shared memory (bytes: 4 x floats) is KV_SH + Q_SH + S_SH + 3 * MAX_G floats
# = 32768 + 8192 + 4096 + 384 = 45440 B, under the 48 KB a block may declare statically on any GPU.
KV_SH = 8192           # a tile of keys then values (32 KB): tile keys <= KV_SH // (d + dv), 32 at d = dv = 128
Q_SH = 2048            # the group's query rows (8 KB): G * d <= Q_SH, so G <= 16 at d = 128
S_SH = 1024            # the tile's G x tile scores, then exp-weights (4 KB): G * tile <= S_SH
MAX_G = 32             # rows of one group: per-row running max, denominator and rescale factor
ACC = 16               # accumulators per thread, in registers: G * dv <= ACC * threads (2048 on a GPU)


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
    kr0, krs, kc0, kcs = lanes(d, tid, nt)        # this thread's rows and columns of a key tile
    for b0 in range(j0, j1, tile):
        nb = min(tile, j1 - b0)
        for jj in range(kr0, nb, krs):             # 1. stage the tile (coalesced), then score it
            for x in range(kc0, d, kcs):
                k_sh[jj * d + x] = float32(k[h, b0 + jj, x])
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
def _group_kernel(q, k, v, g, limits, scale, chunk, tile, m_part, l_part, acc_part):
    """Block ``b``: KV head ``h = b % Hkv`` and key chunk ``c = b // Hkv`` for the G query rows ``h*G + i``.

    Decode attention is memory-bound, so the block reads each K/V element of its chunk once (from HBM,
    coalesced) for all G rows of the group, instead of once per row as ``_chunk_kernel`` does (flash-decoding,
    Dao et al. 2023, with the G query heads of a KV head as one block's rows). Per tile of ``nb`` keys, steps
    1-3 of the module docstring, with :func:`online_softmax_tile`'s arithmetic in its order, per row:

    1. the block stages the tile's keys and values in ``kv_sh`` as float32 (keys first, ``tile * d``
       floats, then values); a head's rows are contiguous, so thread ``t`` reads elements ``t, t + nt, ..``
       (coalesced, float16 or float32 in HBM);
    2. the ``G x nb`` (row, key) scores ``s_ij = q_i . k_j * scale`` are spread over the threads, pair
       ``p = t, t + nt, ..`` is row ``p // nb``, key ``p % nb`` (the group's queries are staged once per
       block in ``q_sh``); each walks the coordinates from a per-key offset (no bank conflicts);
    3. per row ``i`` (thread ``i mod nt``): ``m' = max(m, max_j s_ij)``, ``alpha = exp(m - m')``; then every
       pair becomes ``p_ij = exp(s_ij - m')`` in place in ``s_sh``; ``l = l alpha + sum_j p_ij``;
    4. thread ``t`` owns the output pairs ``e = t + u * nt`` (``u < ACC``) of the ``G x dv`` accumulator,
       row ``e // dv``, column ``e % dv``, held in registers: ``acc = acc alpha + sum_j p_ij v_j[col]``,
       with ``v_j`` from ``kv_sh`` (consecutive threads read consecutive columns).

    Shared memory: ``kv_sh`` 32 KB, ``q_sh`` 8 KB, ``s_sh`` 4 KB, per-row ``m, l, alpha`` 384 B (45440 B,
    whatever the shapes; at d = dv = 128, G = 4 the tile is 32 keys and 32 KB + 2 KB + 512 B of it is used).
    Bytes read per decode step: the K/V once, ``Hkv * N * (d + dv) * 2`` for float16 (``_chunk_kernel``: G
    times that, less what L2 catches), plus ``Hq * d`` query floats per chunk; each block writes ``G`` partials
    ``(m, l, acc)`` in the layout of ``_chunk_kernel`` (float32), merged by ``_merge_kernel``.
    Preconditions (checked by the caller): ``T = 1``, every row of a group has the key limit
    ``limits[h * G]``, ``G <= MAX_G``, ``G * d <= Q_SH``, ``G * dv <= ACC * nt``, ``tile * (d + dv) <= KV_SH``,
    ``G * tile <= S_SH``.
    """
    q_sh = cuda.shared.array(Q_SH, float32)
    kv_sh = cuda.shared.array(KV_SH, float32)
    s_sh = cuda.shared.array(S_SH, float32)
    m_sh = cuda.shared.array(MAX_G, float32)       # running max per row
    l_sh = cuda.shared.array(MAX_G, float32)       # running denominator per row
    a_sh = cuda.shared.array(MAX_G, float32)       # this tile's rescale factor per row
    acc = cuda.local.array(ACC, float32)           # registers: constant size, constant indices
    hkv, _, d = k.shape
    dv = v.shape[2]
    h = cuda.blockIdx.x % hkv
    c = cuda.blockIdx.x // hkv
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    r0 = h * g                                     # the group's first query row
    j0 = c * chunk
    j1 = min(j0 + chunk, limits[r0])               # one limit for the whole group (the caller's promise)
    for e in range(tid, g * d, nt):
        q_sh[e] = q[r0 + e // d, e % d]
    for i in range(tid, g, nt):
        m_sh[i] = NEG_INF
        l_sh[i] = float32(0.0)
    for u in range(ACC):
        acc[u] = float32(0.0)
    cuda.syncthreads()
    v0 = tile * d                                  # values start after the tile's keys
    kr0, krs, kc0, kcs = lanes(d, tid, nt)        # this thread's rows and columns of the K and V tiles
    vr0, vrs, vc0, vcs = lanes(dv, tid, nt)
    for b0 in range(j0, j1, tile):
        nb = min(tile, j1 - b0)
        for jj in range(kr0, nb, krs):             # 1. K and V tiles, each element read once
            for x in range(kc0, d, kcs):
                kv_sh[jj * d + x] = float32(k[h, b0 + jj, x])
        for jj in range(vr0, nb, vrs):
            for x in range(vc0, dv, vcs):
                kv_sh[v0 + jj * dv + x] = float32(v[h, b0 + jj, x])
        cuda.syncthreads()
        for p in range(tid, g * nb, nt):           # 2. G x nb scores across the block
            i = p // nb
            jj = p - i * nb
            s = float32(0.0)
            x = jj % d                             # skewed start: no bank conflicts between keys
            for _ in range(d):
                s += q_sh[i * d + x] * kv_sh[jj * d + x]
                x += 1
                if x == d:
                    x = 0
            s_sh[i * tile + jj] = s * scale
        cuda.syncthreads()
        for i in range(tid, g, nt):                # 3. running max and rescale, in online_softmax_tile's order
            m_new = m_sh[i]
            for jj in range(nb):
                m_new = max(m_new, s_sh[i * tile + jj])
            a_sh[i] = float32(math.exp(m_sh[i] - m_new))      # exp(-inf) = 0 on the first tile
            m_sh[i] = m_new
        cuda.syncthreads()
        for p in range(tid, g * nb, nt):
            i = p // nb
            e = i * tile + p - i * nb
            s_sh[e] = float32(math.exp(s_sh[e] - m_sh[i]))
        cuda.syncthreads()
        for i in range(tid, g, nt):                # l and acc read disjoint shared words: no barrier between
            total = float32(0.0)
            for jj in range(nb):
                total += s_sh[i * tile + jj]
            l_sh[i] = l_sh[i] * a_sh[i] + total
        for u in range(ACC):                       # 4. this thread's (row, column) pairs
            e = tid + u * nt
            if e < g * dv:
                i = e // dv
                x = e - i * dv
                a = acc[u] * a_sh[i]
                for jj in range(nb):
                    a += s_sh[i * tile + jj] * kv_sh[v0 + jj * dv + x]
                acc[u] = a
        cuda.syncthreads()                         # the next tile overwrites kv_sh, s_sh and a_sh
    for i in range(tid, g, nt):
        m_part[c, r0 + i] = m_sh[i]
        l_part[c, r0 + i] = l_sh[i]
    for u in range(ACC):
        e = tid + u * nt
        if e < g * dv:
            i = e // dv
            acc_part[c, r0 + i, e - i * dv] = acc[u]


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


def group_tile(g, d, dv):
    """Keys per tile of :func:`_group_kernel` for groups of ``g`` rows, or 0 when a group does not fit it
    (its queries in ``q_sh``, its accumulators in ``ACC`` registers per thread, one key in the tiles)."""
    if not 1 <= g <= MAX_G or g * d > Q_SH or g * dv > ACC * geometry().threads:
        return 0
    return min(geometry().tile, KV_SH // (d + dv), S_SH // g)


def attention_partials(rows, k, v, t_len, g, limits, scale, group_limits=False):
    """Chunk partials ``(m, l, acc)`` of query ``rows (R, d)`` over ``k, v``; row ``r`` reads KV head ``(r // t_len) // g``.

    ``group_limits=True`` is the caller's promise that the ``g`` rows of each GQA group have the same key
    limit (decode, the execution buffer): with ``t_len == 1`` that routes to :func:`_group_kernel`, which
    reads each K/V element once per group instead of once per row (checking it here would cost a
    device-to-host copy per step)."""
    xm = xp(rows, k, v)
    n_rows, d = rows.shape
    hkv, n, dv = k.shape[0], k.shape[1], v.shape[2]
    if d > MAX_D:
        raise ValueError(f"head_dim {d} is larger than the CUDA kernels' limit of {MAX_D}")
    tile = group_tile(g, d, dv) if (group_limits and t_len == 1) else 0
    # The group kernel launches Hkv blocks per chunk, not Hq: more chunks keep the device as full.
    n_chunks, chunk = split(n, hkv if tile else n_rows)
    m_part = xm.full((n_chunks, n_rows), -np.inf, np.float32)
    l_part = xm.zeros((n_chunks, n_rows), np.float32)
    acc_part = xm.zeros((n_chunks, n_rows, dv), np.float32)
    if not (n and n_rows):
        return m_part, l_part, acc_part
    if tile:
        launch(_group_kernel, n_chunks * hkv, rows, k, v, np.int64(g), limits, np.float32(scale),
               np.int64(chunk), np.int64(tile), m_part, l_part, acc_part)
    else:
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
    out, lse = merge_chunks(*attention_partials(rows, k, v, t, g, limits, scale, group_limits=t == 1))
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
