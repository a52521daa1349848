# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The wave buffer: two memory tiers and a block cache
#
# The wave index (tutorial 01) decides **which** clusters a decode step reads exactly. RetroInfer
# (arXiv 2505.02922, §4.3-4.4) also decides **where they are read from**. A long context's KV cache
# does not fit in GPU memory, so it lives in host memory, and only a small cache of it sits on the GPU:
#
# | tier | holds | on a GPU | here |
# |---|---|---|---|
# | host | every cluster's keys and values, cluster after cluster, in blocks of 8 vectors | pinned host memory | NumPy array |
# | device | a block cache of 5% of the KV, plus the steady zone (sinks + recent window) | device memory | NumPy array |
#
# A small control plane on the CPU keeps the **cluster mapping table** (per cluster: cached or not,
# the device blocks holding it, its host start, its block count) and an **LRU list**. Each step:
#
# 1. look up the retrieved clusters: hits are in the cache, misses are not;
# 2. build the execution buffer `[steady | retrieved clusters in rank order]`, hits read from the
#    device blocks, misses read from the host blocks: **only the misses cross PCIe**;
# 3. admit the misses in rank order, evicting least recently used clusters that this step did not use.
#
# The buffer never changes what is attended, only where it is read from (the paper calls this
# "accuracy-agnostic"). We replay real SmolLM2 decode steps and watch what moves.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import retrokv as rk
from retrokv.harness.data import natural_text_ids
from retrokv.harness.models import capture_qkv, load_smollm2
from retrokv.wave_index import WaveConfig, WaveIndex

SMALL = os.environ.get("RETROKV_TUTORIAL_SMALL") == "1"   # the test suite runs a small version
N_TOKENS = 1024 if SMALL else 4096
STEPS = 48 if SMALL else 256            # the last STEPS positions play the decode steps
LAYER, HEAD = 14, 0

model, tokenizer = load_smollm2()
cap = capture_qkv(model, natural_text_ids(tokenizer, N_TOKENS), layers=[LAYER])[LAYER]
k, v, q_all = cap.k, cap.v, cap.q                       # (Hkv, N, d), (Hkv, N, d), (Hq, N, d)
hkv, n, d = k.shape
start = n - STEPS
index = WaveIndex.build(k[:, :start], v[:, :start], config=WaveConfig(min_index_tokens=0), backend="fast")
buffer = rk.WaveBuffer(index, cache_fraction=0.05)
print(index)
print(buffer)

# %% [markdown]
# ## The host tier: clusters in blocks
#
# Each cluster occupies whole blocks of 8 vectors; its last block is partly filled. The cache has
# room for 5% of the host tier's blocks. `buffer.state` exposes the arrays a GPU port would allocate.

# %%
host, device, table = buffer.state
print(f"host tier:   keys {host.keys.shape} (Hkv, host blocks, block, d), "
      f"{host.keys.nbytes + host.values.nbytes:,} bytes of K+V")
print(f"device tier: keys {device.keys.shape} (Hkv, cache blocks, block, d), "
      f"{device.keys.nbytes + device.values.nbytes:,} bytes of K+V, plus the steady zone {index.steady[0].shape}")
print("\ncluster mapping table, head 0, first 6 clusters:")
print(" cluster  size  host start  blocks  last block  cached")
for i in range(6):
    size, nb = host.sizes[HEAD, i], host.n_blocks[HEAD, i]
    print(f"{i:8d} {size:5d} {host.start[HEAD, i]:11d} {nb:7d} {size - (nb - 1) * 8:11d}  {table.cached[HEAD, i]}")
plt.figure(figsize=(6, 2.5))
plt.hist(host.sizes[HEAD], bins=np.arange(0, host.sizes[HEAD].max() + 9, 8) - 0.5, color="tab:blue")
plt.xlabel("cluster size (vectors); bins are whole blocks")
plt.ylabel("clusters")
plt.title("How many blocks a cluster needs")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## One step, in detail
#
# The first decode step finds an empty cache: every retrieved cluster is a miss, is read from the
# host tier and is admitted. We take a few steps and print what the control plane did.

# %%
def step(t, buf):
    """One decode step at position t: the token joins the index, its query attends through the buffer."""
    index.append(k[:, t], v[:, t])
    return index.attend(q_all[:, t], buffer=buf)


for t in range(start, start + 4):
    step(t, buffer)
    s = buffer.stats
    print(f"step {s.step}: retrieved {index.last_stats.retrieval_clusters[HEAD].tolist()} (head 0); "
          f"{s.hits} hits, {s.misses} misses, {s.admitted} admitted, {s.evicted} evicted over {hkv} heads; "
          f"{s.bytes_h2d:,} of {s.bytes_no_cache:,} bytes crossed to the device; cache {s.occupancy:.0%} full")
print("LRU order of head 0 (least recent first):", buffer.cached_clusters(HEAD).tolist())

# %% [markdown]
# ## Over a whole decode
#
# We continue to the end. `buffer.last_step` says, per retrieved cluster, whether it was a hit (read
# from the device) or a miss (fetched from the host), and whether the miss was admitted. Consecutive
# queries of a decode look at similar clusters, which is what the cache exploits. We also check the
# accuracy-agnostic property: the output with the buffer equals the output without it.

# %%
marks, max_diff = [], 0.0
for t in range(start + 4, n):
    index.append(k[:, t], v[:, t])
    q = q_all[:, t]
    plain = index.attend(q)
    out = index.attend(q, buffer=buffer)
    max_diff = max(max_diff, float(np.abs(out - plain).max()))
    res = buffer.last_step
    marks.append(np.where(res.hit[HEAD], 2, np.where(res.admitted[HEAD], 1, 0)))   # by rank
print(f"max |attend with buffer - attend without| over {len(marks)} steps: {max_diff:.1e}")
# Checked: the buffer is accuracy-agnostic -- it changes where KV is read from, never what is attended.
assert max_diff < 1e-6
print(buffer)
width = max(len(m) for m in marks)
img = np.full((width, len(marks)), np.nan)
for j, m in enumerate(marks):
    img[:len(m), j] = m
plt.figure(figsize=(11, 2.2))
plt.imshow(img, aspect="auto", cmap=plt.matplotlib.colors.ListedColormap(["tab:gray", "tab:red", "tab:green"]),
           vmin=0, vmax=2, interpolation="nearest")
plt.yticks(range(width))
plt.xlabel("decode step")
plt.ylabel("rank")
plt.title("head 0: green = hit (device), red = miss fetched from host and admitted, grey = miss bypassed")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Hit ratio and bytes over time, for three cache sizes
#
# Buffers of different sizes over one index see the same retrieval sequence, since the buffer does
# not change what the index retrieves. We replay the decode with three of them side by side.

# %%
idx = WaveIndex.build(k[:, :start], v[:, :start], config=WaveConfig(min_index_tokens=0), backend="fast")
bufs = {f: rk.WaveBuffer(idx, cache_fraction=f) for f in (0.02, 0.05, 0.10)}
for t in range(start, n):
    idx.append(k[:, t], v[:, t])
    idx.attend(q_all[:, t], buffer=bufs[0.05])
    for f in (0.02, 0.10):
        bufs[f].gather(idx.last_stats.retrieval_clusters)

fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.5))
for f, b in bufs.items():
    ratio = np.array([x.hit_ratio for x in b.history])
    a0.plot(np.arange(1, len(ratio) + 1), np.convolve(ratio, np.ones(8) / 8, mode="valid").tolist() + [np.nan] * 7,
            label=f"cache {f:.0%}")
    a1.plot([x.bytes_h2d / 1024 for x in b.history], lw=1, label=f"cache {f:.0%}")
a1.plot([x.bytes_no_cache / 1024 for x in bufs[0.05].history], "k:", lw=1, label="no cache")
a0.set_xlabel("decode step")
a0.set_ylabel("hit ratio (8-step mean)")
a0.set_ylim(0, 1)
a0.legend()
a1.set_xlabel("decode step")
a1.set_ylabel("KiB host -> device")
a1.legend()
fig.suptitle(f"SmolLM2 layer {LAYER}: wave buffer hit ratio and bytes moved per step")
plt.tight_layout()
plt.show()
for f, b in bufs.items():
    s = b.stats
    print(f"cache {f:.0%}: cumulative hit ratio {s.cumulative_hit_ratio:.3f}, "
          f"{s.total_bytes_h2d / max(s.total_bytes_no_cache, 1):.1%} of the no-cache bytes moved")
# Checked: a cache never moves more bytes than no cache, and the largest cache hits at least as often as the smallest.
assert all(b.stats.total_bytes_h2d <= b.stats.total_bytes_no_cache for b in bufs.values())
assert bufs[0.10].stats.cumulative_hit_ratio >= bufs[0.02].stats.cumulative_hit_ratio

# %% [markdown]
# The cache starts cold, so the first steps are all misses; after that the hit ratio settles
# where the decode's locality allows. (At the small size the test suite runs, 1024 tokens, a step
# retrieves one cluster per head and a 5% cache holds only about three clusters, so the ratios are
# lower than at 4096 tokens.) A bigger cache catches clusters that come back after a longer
# absence. The full measurement over all 30 layers of a 256-token generation is
# `benchmarks/wave_buffer.py` (see the docs page "Wave buffer").
