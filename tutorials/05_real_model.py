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
# # 05 · Retrieval attention inside a real model
#
# The indexes of tutorials 01–02 become useful when a model decodes through them. `retrokv.hf.attach`
# registers one attention function in transformers' `AttentionInterface` and switches the model to
# it, so a plain `model.generate(...)` runs with the method:
#
# * the **prefill** runs dense (SDPA) and then builds the method's index per layer and KV head
#   (RetroInfer §4.2, RetrievalAttention §3.3);
# * each **decode step** appends the new key/value (it joins the steady/static window) and attends
#   through the index; the output goes back to the model's own `o_proj`.
#
# `hf.index_cache()` is a transformers `Cache` that keeps no KV of its own (the index holds it), so
# a decode step does not copy the whole context as `DynamicCache`'s concatenation does.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

from retrokv.harness import eval as E
from retrokv import hf
from retrokv.harness.models import load_smollm2

SMALL = os.environ.get("RETROKV_TUTORIAL_SMALL", "1") == "1"
N = 512 if SMALL else 4096            # prompt tokens
model, tok = load_smollm2()
sample = E.passkey(tok, N, depth=0.4, seed=7)
ids = torch.tensor([sample.prompt_ids])
print(f"{N}-token passkey prompt; the key is {sample.answer}")

# %% [markdown]
# ## Generate with each method
#
# StreamingLLM gets the wave index's exact budget: 4 sinks + 64 recent tokens + 1.8% of the context.
# The graph builds from 256 of the prefill queries to keep this notebook quick.

# %%
from retrokv.graph_index import GraphConfig
from retrokv.wave_index import WaveConfig

configs = {"streaming": E.method_config("streaming", N), "graph": GraphConfig(build_queries=256)}
if SMALL:   # the small test prompt is below the wave index's build threshold (4 + 64 + 1024): index it anyway
    configs["wave"] = WaveConfig(min_index_tokens=0)
handles, answers = {}, {}
for method in ["full", "streaming", "topk", "quest", "ivf", "wave", "graph"]:
    h = hf.attach(model, method, config=configs.get(method), backend="fast")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=hf.index_cache(),
                             pad_token_id=tok.eos_token_id)
    hf.detach(model)
    handles[method] = h
    answer = answers[method] = tok.decode(out[0, N:], skip_special_tokens=True)
    print(f"{method:>9}: {answer!r:28} density {h.mean_density():.3f}")
# Checked: with full attention the model finds the passkey, and the wave index reads a fraction of the context.
assert str(sample.answer) in answers["full"]
assert handles["wave"].mean_density() < 0.5

# %% [markdown]
# ## Per-layer statistics
#
# After a generate call the handle holds, per layer, the mean over decode steps of what the index
# reported: the fraction of the context read exactly (`density`), the vectors scored to choose what
# to read (`keys_scored`) and the bytes read. Layer 0 of SmolLM2 spreads its attention widely
# (tutorial 00), which is why some systems keep the first layers dense (`dense_layers=[0, 1]`).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for method in ["streaming", "ivf", "wave", "graph"]:
    st = handles[method].layer_stats()
    layers = sorted(st)
    axes[0].plot(layers, [st[l]["density"] for l in layers], marker="o", ms=3, label=method)
    axes[1].plot(layers, [st[l]["bytes_read"] / 1024 for l in layers], marker="o", ms=3, label=method)
axes[0].set(xlabel="layer", ylabel="density (exact fraction)", yscale="log")
axes[1].set(xlabel="layer", ylabel="KiB read per decode step", yscale="log")
axes[0].legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## How far is each method from full attention?
#
# `retrokv.harness.eval.layer_errors` replays the last positions of a captured prompt as decode steps and
# compares each method's output with exact attention: relative error, density and (for the wave
# index) recall@100 of the exactly attended set.

# %%
from retrokv.harness.models import capture_qkv

captured = capture_qkv(model, list(sample.prompt_ids), layers=[2, 10, 20])
for method in ["streaming", "wave"]:
    rows = E.layer_errors(captured, method, configs.get(method), backend="fast", n_queries=4)
    print(method, [(r["layer"], round(r["error"], 3), round(r["density"], 3)) for r in rows])

# %% [markdown]
# The same machinery drives `retrokv eval` (passkey / needle tasks, perplexity, per-layer error) and
# `make demo`; their measured tables are on the *Generation and evaluation* page.
