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
# # 06 · Testing your own attention kernel
#
# You have written an attention kernel: a Triton decode kernel, a paged-KV CUDA kernel, a new sparse
# index. How do you know it is right? Comparing with `np.allclose(atol=1e-3)` is the usual answer and
# a poor one: too loose for float32, too tight for bfloat16, and blind to the inputs (a 100-wide score
# range is much harder than a 1-wide one).
#
# `retrokv.testing` packages what retrokv uses to test its own kernels:
#
# * **oracles**: float64 attention with its log-sum-exp, and each method's reference output;
# * **`assert_attention_close`**: FlashAttention's rule — the kernel's error against the float64 oracle
#   may be at most a small multiple of the error a plain implementation *in the same precision* makes;
# * **strategies**: hypothesis generators of hard attention problems;
# * **invariants**: properties from the papers (LSE merge, zones, Jensen bound, RoPE composition);
# * **real data**: a cached sample of SmolLM2's queries, keys and values.
#
# We test a third-party kernel end to end: PyTorch's `scaled_dot_product_attention` (SDPA) on the CPU.

# %%
import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

import retrokv as rk
from retrokv.testing import assert_attention_close, invariants, oracles, strategies

SMALL = os.environ.get("RETROKV_TUTORIAL_SMALL", "1") == "1"
EXAMPLES = 40 if SMALL else 400          # hypothesis examples per property


def sdpa(q, k, v, causal=False, dtype=torch.float32):
    """SDPA in retrokv's layout: q (Hq, [T,] d), k/v (Hkv, N, d); GQA by enable_gqa.

    torch's is_causal aligns the mask top-left (query t sees keys 0..t); retrokv's causal block is the
    *last* T positions (query t sees keys 0..N-T+t), so we pass that mask explicitly.
    """
    decode = q.ndim == 2
    q3 = q[:, None] if decode else q
    t, n = q3.shape[1], k.shape[1]
    tq, tk, tv = (torch.as_tensor(x).to(dtype)[None] for x in (q3, k, v))   # (1, H, T, d)
    mask = None
    if causal and not decode:
        mask = torch.arange(n)[None, :] <= (n - t + torch.arange(t))[:, None]
    out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, enable_gqa=True)[0]
    return out[:, 0] if decode else out


rng = np.random.default_rng(0)
q = rng.standard_normal((6, 8, 64)).astype(np.float32)     # 6 query heads, a block of 8 queries
k = rng.standard_normal((2, 300, 64)).astype(np.float32)   # 2 KV heads: GQA group of 3
v = rng.standard_normal((2, 300, 64)).astype(np.float32)

report = assert_attention_close(sdpa(q, k, v, causal=True), q, k, v, causal=True)
print(report.out)

# %% [markdown]
# The assertion passed and returned its verdict: SDPA's largest error against float64 attention,
# the error of retrokv's float32 reference on the same inputs, and the bound
# `atol_factor × reference error + floor` (factor 4 by default; the floor is one float32 ulp of
# `max |v|` plus what float32 rounding of the scores alone can cause).
#
# ## Low precision is judged in its own precision
#
# In bfloat16 every input and the output carry 8 bits of mantissa, so errors of ~1e-2 are the
# precision, not a bug. The kit emulates the same computation in bfloat16 (inputs and output rounded,
# float32 in between, as tensor cores accumulate) and judges SDPA against *that* error.

# %%
for dtype in (torch.float16, torch.bfloat16):
    out = sdpa(q, k, v, causal=True, dtype=dtype)
    r = assert_attention_close(out, q, k, v, causal=True)          # precision read from out.dtype
    print(f"{r.out.precision:9s} max error {r.out.max_error:.2e}  reference error {r.out.reference_error:.2e}"
          f"  bound {r.out.bound:.2e}")

try:   # the same bfloat16 output judged as if it were float32 fails
    assert_attention_close(sdpa(q, k, v, causal=True, dtype=torch.bfloat16), q, k, v, causal=True, dtype="float32")
except AssertionError as e:
    print(e)

# %% [markdown]
# ## Two buggy kernels
#
# Each is a plausible one-character mistake. The message says what differed (`out` or `lse`), where
# (query head, the KV head it reads, query row and position, channel), by how much (max and mean error,
# how many entries are over) and against which bound.


# %%
def my_attention(q, k, v, causal=False, scale=None):
    """A hand-written kernel: GQA by repeat, max-subtracted softmax."""
    q, k, v = (torch.as_tensor(x) for x in (q, k, v))
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)   # (Hq, T, N)
    if causal:
        t, n = s.shape[-2:]
        s = s.masked_fill(torch.arange(n)[None, :] > (n - t + torch.arange(t))[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


def wrong_scale(q, k, v, causal=False):
    """Bug 1: divides the scores by d instead of sqrt(d)."""
    return my_attention(q, k, v, causal, scale=1.0 / q.shape[-1])


def off_by_one_window(q, k, v, causal=False):
    """Bug 2: a query does not see its own key (``<`` where ``<=`` was meant)."""
    q, k, v = (torch.as_tensor(x) for x in (q, k, v))
    g = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    t, n = s.shape[-2:]
    s = s.masked_fill(torch.arange(n)[None, :] >= (n - t + torch.arange(t))[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


assert_attention_close(my_attention(q, k, v, causal=True), q, k, v, causal=True)   # the correct one passes
for bug in (wrong_scale, off_by_one_window):
    try:
        assert_attention_close(bug(q, k, v, causal=True), q, k, v, causal=True)
        print(f"{bug.__name__}: NOT caught")
    except AssertionError as e:
        print(f"{bug.__name__} caught:\n{e}\n")

# %% [markdown]
# The same check catches a real pitfall: SDPA's own `is_causal=True` aligns the mask top-left. For a
# prefill chunk of T queries appended to N - T cached keys that is wrong (query 0 would see only key 0).

# %%
tq, tk, tv = (torch.from_numpy(x)[None] for x in (q, k, v))
topleft = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)[0]
try:
    assert_attention_close(topleft, q, k, v, causal=True)
except AssertionError as e:
    print(e)

# %% [markdown]
# ## Property-based testing with the strategies
#
# One input proves little. `strategies.attention_problems()` draws shapes with the edges kernels get
# wrong (N = 0 and 1, odd head_dim, dv ≠ d, GQA groups, causal blocks) and adversarial values: scores
# up to 1e4 (a softmax that forgets to subtract the maximum overflows past ~88.7 in float32),
# duplicate and all-equal keys, one dominant key, queries far from the key cloud. hypothesis runs the
# property on many of them and, on a failure, *shrinks* to a small failing problem.

# %%
from hypothesis import HealthCheck, given, settings

quick = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))


seen = {}


@quick
@given(strategies.attention_problems())
def sdpa_is_attention(p):
    assert_attention_close(sdpa(p.q, p.k, p.v, p.causal), p.q, p.k, p.v, causal=p.causal)
    seen.setdefault(p.regime, p)


sdpa_is_attention()
print(f"SDPA passed {EXAMPLES} drawn problems, among them:")
for p in seen.values():
    print(" ", p)


@quick
@given(strategies.attention_problems(regimes=("gaussian",), decode=False, causal=True))
def buggy_is_attention(p):
    assert_attention_close(off_by_one_window(p.q, p.k, p.v, True), p.q, p.k, p.v, causal=True)


try:
    buggy_is_attention()
except AssertionError as e:
    print("hypothesis shrank the failure to:", *getattr(e, "__notes__", [])[:1])
    print(str(e).splitlines()[1])

# %% [markdown]
# ## Real attention: SmolLM2's queries and keys
#
# Gaussian data is gentle: real attention is sparse and queries sit away from the keys
# (RetrievalAttention §2). `load_real_qkv()` captures a few layers of the embedded SmolLM2 once
# (~512 tokens, float16, cached under `$RETROKV_CACHE` or `~/.cache/retrokv`) and turns any position
# into a problem.

# %%
from retrokv.testing import load_real_qkv

sample = load_real_qkv()
print(sample)
for layer in sample.layers:
    p = sample.problem(layer, n_queries=32)                 # a causal block of 32 real queries
    r = assert_attention_close(sdpa(p.q, p.k, p.v, causal=True), p.q, p.k, p.v, causal=True)
    print(f"layer {layer:2d}: scores in [{p.score_range()[0]:6.1f}, {p.score_range()[1]:5.1f}]  "
          f"SDPA error {r.out.max_error:.1e} <= bound {r.out.bound:.1e}")

# %% [markdown]
# ## A sparse kernel against retrokv's sparse reference
#
# A re-implementation of RetroInfer's tripartite attention should not equal full attention (it
# estimates and drops clusters) but retrokv's reference of the *same method*. Pass it as `reference`:
# the kernel must match it up to the rounding noise exact attention has at that precision on the same
# inputs. Here the "kernel" is retrokv's own Numba wave index, standing in for yours; the invariants
# check its zones and centroids against RetroInfer §4.1 and Eq. 3.

# %%
p = sample.problem(sample.layers[1])                       # one decode step, 512 real keys
cfg = rk.WaveConfig(n_local=32, tokens_per_cluster=8, retrieval_budget=0.1, estimation_budget=0.3, min_index_tokens=0)
index = rk.WaveIndex.build(p.k, p.v, config=cfg, backend="fast")
out, lse = index.attend(p.q, return_lse=True)
r = assert_attention_close(out, p.q, p.k, p.v, lse=lse, reference=functools.partial(oracles.wave_reference, config=cfg))
print(f"fast wave vs reference wave: error {r.out.max_error:.1e} <= bound {r.out.bound:.1e}")

invariants.check_zones_partition(index)                   # every token in exactly one zone
invariants.check_jensen_lower_bound(p.q, index.meta)      # centroid estimates never over-count (Eq. 3)
invariants.check_full_budget_equals_full_attention(rk.WaveIndex, p.q, p.k, p.v, backend="fast")
print("zones, Jensen bound and full budget: ok")
