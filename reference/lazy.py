"""LazyAttention (arXiv 2606.04302): attention over documents whose keys carry document-local RoPE.

Each document is prefilled ALONE from position 0, so its cached key ``i`` is ``R(i) k_i``. A request
``[doc_0 ... doc_{n-1}, question]`` places document ``d`` at the logical offset ``S_d = sum_{e<d} L_e``:
its token ``i`` sits at ``S_d + i`` and the question follows all documents. Because RoPE rotations
compose and are orthogonal (RoFormer Eq. 34, LazyAttention §3),

    <R(p) q, R(S_d + i) k>  =  <R(p) q, R(S_d) R(i) k>  =  <R(p - S_d) q, R(i) k>,

the physical copy never has to change: either rotate the cached keys by ``+S_d`` inside the attention
loop (prefill: one small block at a time, never the whole document), or rotate the query once by
``-S_d`` per document (decode: cheaper than rotating every key). Documents do not attend to each
other (block-diagonal, as Block-Attention); the question attends causally to itself and to every
document.

Physical layout (LazyAttention §4, the paged KV pool): a pool ``(Hkv, n_blocks * B, d)`` of B-token
blocks (B = 16 in the paper). A document occupies ``ceil(L / B)`` blocks, the last one padded. A request
is described by a **block table** ``(nb, 3)`` of int64 rows ``(physical block, valid tokens, document
index)`` in logical order, and ``offsets[doc]`` = the logical position of the document's token 0.

Block-Attention (arXiv 2409.15355) is the baseline: it materialises a re-rotated copy of every
document's keys at its new position before attending (:func:`materialize`, :func:`block_attention`).
"""
from __future__ import annotations

import numpy as np

from .attention import merge_partials, partial_attention
from .rope import rotate_by

__all__ = ["lazy_prefill_attention", "lazy_decode_attention", "materialize", "block_attention"]


def _block_rows(entry, block):
    """Pool rows of one block-table entry ``(physical block, valid tokens, document)``."""
    phys, n, _ = (int(x) for x in entry)
    return np.arange(phys * block, phys * block + n)


def lazy_prefill_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                           theta=10000.0, convention="half", scale=None):
    """Question tokens attending to lazily re-positioned documents and causally to themselves.

    Args:
        q: ``(Hq, T, d)`` queries, already rotated to their logical positions.
        k_tail, v_tail: ``(Hkv, M, d)`` keys/values after the documents (the question, and any tokens
            before it in the tail), rotated to logical positions; the T queries are the last T of them.
        pool_k, pool_v: ``(Hkv, P, d)`` the physical pool; documents hold document-local RoPE.
        table: ``(nb, 3)`` block table (physical block, valid tokens, document index).
        offsets: ``(n_docs,)`` logical offset of each document.

    Returns ``(out (Hq, T, dv), lse (Hq, T))``. Each key block is rotated by its document's offset
    into a one-block scratch (the paper rotates the K tile in registers), attended, and merged by
    log-sum-exp: the rotated document is never materialised.
    """
    parts = []
    for entry in np.asarray(table).reshape(-1, 3):
        rows = _block_rows(entry, block)
        delta = int(offsets[int(entry[2])])
        k_blk = rotate_by(pool_k[:, rows], delta, theta, convention)        # (Hkv, <=B, d) scratch
        parts.append(partial_attention(q, k_blk, pool_v[:, rows], scale=scale))
    parts.append(partial_attention(q, k_tail, v_tail, causal=True, scale=scale))
    return merge_partials(parts)


def lazy_decode_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                          theta=10000.0, convention="half", scale=None):
    """One decode query attending to lazily re-positioned documents and to every tail token.

    ``q`` is ``(Hq, d)`` at its logical position ``p``. For document ``d`` the query is de-rotated once,
    ``R(-S_d) q``, and scored against the document-local keys as stored; the tail ``(Hkv, M, d)``
    (question and generated tokens, logical positions, M may be 0) is read with the query as given.
    Returns ``(out (Hq, dv), lse (Hq,))``. Other arguments as :func:`lazy_prefill_attention`.
    """
    table = np.asarray(table).reshape(-1, 3)
    parts = []
    for doc, delta in enumerate(np.asarray(offsets)):
        entries = table[table[:, 2] == doc]
        if len(entries) == 0:
            continue
        rows = np.concatenate([_block_rows(e, block) for e in entries])   # the document's pool rows
        q_doc = rotate_by(q, -int(delta), theta, convention)               # (Hq, d), once per document
        parts.append(partial_attention(q_doc, pool_k[:, rows], pool_v[:, rows], scale=scale))
    parts.append(partial_attention(q, k_tail, v_tail, scale=scale))
    return merge_partials(parts)


def materialize(pool_k, pool_v, table, offsets, block=16, theta=10000.0, convention="half"):
    """Block-Attention's step: contiguous copies of the documents, keys re-rotated to logical positions.

    Returns ``(k (Hkv, L, d), v (Hkv, L, dv))`` with ``L`` the documents' total length, in logical order:
    document ``d``'s key ``i`` becomes ``R(S_d) R(i) k_i``. These are new arrays (the cost LazyAttention avoids).
    """
    table = np.asarray(table).reshape(-1, 3)
    hkv, d, dv = pool_k.shape[0], pool_k.shape[2], pool_v.shape[2]
    if len(table) == 0:
        return np.zeros((hkv, 0, d), np.float32), np.zeros((hkv, 0, dv), np.float32)
    rows = np.concatenate([_block_rows(e, block) for e in table])                       # (L,)
    deltas = np.concatenate([np.full(int(e[1]), int(offsets[int(e[2])])) for e in table])  # (L,)
    k = rotate_by(pool_k[:, rows], deltas[None, :], theta, convention)                    # (Hkv, L, d)
    return k.astype(np.float32), np.ascontiguousarray(pool_v[:, rows], dtype=np.float32)


def block_attention(q, k_tail, v_tail, pool_k, pool_v, table, offsets, block=16,
                    theta=10000.0, convention="half", scale=None):
    """Block-Attention baseline: materialise the re-rotated documents, then ordinary attention.

    ``q`` is ``(Hq, T, d)`` (prefill: causal over the tail, every document visible) or ``(Hq, d)``
    (decode: everything visible). Returns ``(out, lse)``; mathematically equal to the lazy functions.
    """
    k_docs, v_docs = materialize(pool_k, pool_v, table, offsets, block, theta, convention)
    k = np.concatenate([k_docs, np.asarray(k_tail, np.float32)], axis=1)     # (Hkv, L + M, d)
    v = np.concatenate([v_docs, np.asarray(v_tail, np.float32)], axis=1)
    return partial_attention(q, k, v, causal=np.ndim(q) == 3, scale=scale)
