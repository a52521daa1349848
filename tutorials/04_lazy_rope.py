# %% [markdown]
# # 04 · LazyAttention: one copy of a document's KV, reused at any position
#
# *LazyAttention* (arXiv 2606.04302, ICML 2026) asks a simple question about retrieval-augmented
# generation: the same documents come back in request after request, in different orders. Why prefill
# them again every time? Because **cached keys carry their positions**: RoPE has already rotated each
# key by its absolute position, so a document cached at positions 0..L-1 looks wrong at 800..800+L-1.
#
# This notebook walks through
# 1. why cached keys carry positions,
# 2. the relative-rotation identity that makes them movable (LazyAttention §3),
# 3. `retrokv.DocumentStore`: one physical copy, re-positioned inside attention (§4), against
#    Block-Attention, which materialises re-rotated copies,
# 4. the physical vs logical layout, and
# 5. why one copy per document matters for a cache of limited size (§5, capacity analysis).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import retrokv as rk
from retrokv.lazy import DocumentStore, LazyConfig

SMALL = os.environ.get("RETROKV_TUTORIAL_SMALL") == "1"
D, THETA = 64, 1e5                       # SmolLM2's head_dim and RoPE theta
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Cached keys carry positions
#
# RoPE (RoFormer Eq. 34) turns coordinate pair *i* of a key at position *p* by the angle
# `p * theta^(-2i/d)`. The cache stores the rotated key `R(p) k`. Take one query and one key and move
# the key: the score changes with the distance, which is the point of a positional encoding, and the
# reason a key cached at the wrong position gives the wrong score.

# %%
q = rng.standard_normal(D).astype(np.float32)
k = q + 0.3 * rng.standard_normal(D).astype(np.float32)          # a key the query likes
p_q = 300
dists = np.arange(0, 300)
scores = [float(rk.apply_rope(q, p_q, THETA) @ rk.apply_rope(k, p_q - dd, THETA)) for dd in dists]
plt.figure(figsize=(7, 3))
plt.plot(dists, scores)
plt.xlabel("distance between query and key (tokens)")
plt.ylabel("q·k after RoPE")
plt.title("the same key scores differently at different positions")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The relative-rotation identity
#
# Rotations compose and are orthogonal, so `<R(a) q, R(b) k> = <R(a-b) q, k>` and
# `R(delta) R(i) k = R(i + delta) k`. A key cached at document-local position *i* can be **moved** to
# `S + i` by one more rotation by `S` (`rk.rotate_by`), or, equivalently, the query can be rotated
# *back* by `-S`. Both give the score of a key rotated from scratch to `S + i`, up to float32 rounding
# of the angles.

# %%
S, i, p = 700, 5, 1000
k_local = rk.apply_rope(k, i, THETA)                              # what the document's cache holds
q_at_p = rk.apply_rope(q, p, THETA)
from_scratch = q_at_p @ rk.apply_rope(k, S + i, THETA)
moved_key = q_at_p @ rk.rotate_by(k_local, S, THETA)              # prefill: rotate the key by +S
moved_query = rk.rotate_by(q_at_p, -S, THETA) @ k_local           # decode: rotate the query by -S
print(f"from scratch {from_scratch:.6f}   key moved {moved_key:.6f}   query moved back {moved_query:.6f}")
# Checked: moving the cached key by +S, or the query back by -S, gives the score of a key rotated from scratch.
assert np.isclose(moved_key, from_scratch, rtol=1e-4, atol=1e-4)
assert np.isclose(moved_query, from_scratch, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## 3. One physical copy, re-positioned inside attention
#
# `DocumentStore.put` keeps each document's KV exactly as it was prefilled alone from position 0.
# `request([...])` lays documents out one after another: document *d* starts at
# `S_d = sum of the lengths before it`, the question after all of them. Attention then
#
# * **prefill** (`prefill_attention`): rotates each 16-token key block by `S_d` inside the kernel,
#   a block at a time, never a full rotated copy;
# * **decode** (`decode_attention`): rotates the query once per document by `-S_d`.
#
# Documents do not attend to each other (block-diagonal, as Block-Attention); the question attends to
# all of them and causally to itself. **Block-Attention** (`block_attention`) gets the same numbers by
# materialising re-rotated copies first.

# %%
n_docs, doc_len, hkv, g = (3, 40, 2, 3) if SMALL else (5, 400, 3, 3)
store = DocumentStore(LazyConfig(theta=THETA), backend="fast")
docs = []
for dd in range(n_docs):
    tokens = list(range(10_000 * dd, 10_000 * dd + doc_len + 7 * dd))   # documents of different lengths
    n = len(tokens)
    k_doc = rk.apply_rope(rng.standard_normal((hkv, n, D)).astype(np.float32), np.arange(n), THETA)
    store.put(tokens, k_doc, rng.standard_normal((hkv, n, D)).astype(np.float32))
    docs.append(tokens)
print(f"{len(store)} documents, {store.nbytes / 1e6:.2f} MB of KV held")

T = 8
q_blk = rng.standard_normal((hkv * g, T, D)).astype(np.float32)
k_q = rng.standard_normal((hkv, T, D)).astype(np.float32)
v_q = rng.standard_normal((hkv, T, D)).astype(np.float32)
orders = [list(range(n_docs)), list(range(n_docs))[::-1], [int(o) for o in np.roll(range(n_docs), 1)]]
requests = []
held = store.nbytes
for order in orders:
    req = store.request([docs[o] for o in order])
    lazy = store.prefill_attention(req, q_blk, k_q, v_q)
    block = store.block_attention(req, q_blk, k_q, v_q)
    requests.append(req)
    # Checked: lazy re-positioning inside attention equals Block-Attention's materialised copies ...
    assert np.abs(lazy - block).max() < 1e-4
    print(f"order {order}: offsets {[int(o) for o in req.offsets]}, max |lazy - Block-Attention| = {np.abs(lazy - block).max():.1e}")
print(f"KV held after {len(orders)} orders: {store.nbytes / 1e6:.2f} MB (unchanged); "
      f"a position-aware cache would hold {store.position_aware_nbytes(requests) / 1e6:.2f} MB")
assert store.nbytes == held      # ... and serving new orders stores nothing new

# %% [markdown]
# ## 4. Physical vs logical layout
#
# The physical pool is a row of 16-token blocks (the last block of a document is padded). A request is
# only a **block table**: which physical blocks, in which logical order, moved by which offset. Two
# requests with different orders read the same blocks.

# %%
colors = plt.cm.tab10(np.arange(n_docs))
fig, axes = plt.subplots(1 + len(requests[:2]), 1, figsize=(9, 3.6), sharex=True)
blk = store.config.block
for dd, tokens in enumerate(docs):
    doc = store.get(tokens)
    for j, phys in enumerate(doc.blocks):
        used = min(blk, doc.length - j * blk)
        axes[0].barh(0, used, left=phys * blk, color=colors[dd], edgecolor="k", linewidth=0.3)
        axes[0].barh(0, blk - used, left=phys * blk + used, color="lightgrey", edgecolor="k", linewidth=0.3)
axes[0].set_title("physical pool (blocks of 16 tokens; grey = padding)")
for ax, req, order in zip(axes[1:], requests, orders):
    for dd, off in zip(order, req.offsets):
        ax.barh(0, len(docs[dd]), left=off, color=colors[dd], edgecolor="k")
        ax.text(off + len(docs[dd]) / 2, 0, f"doc {dd}\nS={off}", ha="center", va="center", fontsize=8)
    ax.barh(0, T, left=req.question_start, color="black")
    ax.set_title(f"logical layout of request {order} (black: question)")
for ax in axes:
    ax.set_yticks([])
axes[-1].set_xlabel("token position")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Why one copy per document matters: capacity
#
# A cache that stores KV per (document, position) needs up to *D* copies of a document that can appear
# at *D* positions. With a budget of *C* entries and Zipf(α) popularity, a position-agnostic cache holds
# the top *C* documents, a position-aware one only the top ⌊C/D⌋ at every position, so the hit ratios
# differ by `H(C, α) / H(⌊C/D⌋, α)` with `H(n, α) = sum_{i<=n} i^-α` — 2.87x at D = 20, C = 100,
# α = 0.85 (the paper reports 2.86x). `benchmarks/lazy_rag.py` checks it by simulation.

# %%
def harmonic(n, alpha):
    return (np.arange(1, n + 1, dtype=np.float64) ** -alpha).sum() if n else 0.0


C = 100
positions = np.arange(1, 51)
plt.figure(figsize=(7, 3))
for alpha in (0.85, 1.2, 2.1):
    plt.plot(positions, [harmonic(C, alpha) / harmonic(C // dd, alpha) for dd in positions], label=f"α = {alpha}")
plt.axvline(20, color="grey", ls=":")
plt.xlabel("D, positions a document can take")
plt.ylabel("hit-ratio gain of one copy")
plt.title(f"position-agnostic vs position-aware cache, C = {C}")
plt.legend()
plt.tight_layout()
plt.show()
gain = harmonic(100, 0.85) / harmonic(5, 0.85)
print(f"D=20, C=100, α=0.85: {gain:.2f}x")
assert abs(gain - 2.86) < 0.02    # Checked: the paper's capacity analysis (2.86x)

# %% [markdown]
# **The catch.** A stock model was never trained with documents that cannot see each other, and each
# document prefilled alone starts with its own spurious attention sink. The paper uses block-fine-tuned
# checkpoints; on the stock SmolLM2 the RAG benchmark (`docs/lazy.md`) shows the accuracy drop.
