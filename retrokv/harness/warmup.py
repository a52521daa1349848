"""``retrokv warmup``: compile the fast backend's Numba kernels once, into Numba's on-disk cache.

Every Numba kernel of :mod:`retrokv.fast` is ``cache=True``: its first call in a fresh checkout compiles
it (about a minute and a half for the kernels ``make demo`` runs, on a 2-core machine: the graph search
and the wave index's fused decode step take the longest) and writes the machine code next to its
source, where every later process finds it. ``make setup`` runs this command, so that a first
``make demo``, test run or notebook does not pay the compilation.

Each registered method is built over a small random KV with SmolLM2's attention shape (3 KV heads,
9 query heads, d = 64; 3000 tokens: more than the graph build's IVF threshold, so that its kNN kernels
compile too), then decodes one step, appends one token and decodes again. The arrays have the types of
a real run's, so the cached signatures are the ones a real run asks for.
"""
from __future__ import annotations

import time

import numpy as np

from .. import methods as _methods

SHAPE = {"hkv": 3, "hq": 9, "d": 64, "tokens": 3000}


def warmup(names=None, progress=True) -> dict:
    """Build, decode and append once with every method in ``names`` (default: all registered), fast
    backend, CPU. Returns the seconds each took (compilation included when the cache was cold)."""
    from tqdm.auto import tqdm

    names = _methods.names() if names is None else tuple(names)
    unknown = [n for n in names if n not in _methods.names()]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(_methods.names())}")
    rng = np.random.default_rng(0)
    hkv, hq, d, n = SHAPE["hkv"], SHAPE["hq"], SHAPE["d"], SHAPE["tokens"]
    # clustered keys, as real keys are: the graph build's IVF kNN then passes its self-check and takes
    # the IVF path (structureless Gaussian keys would send it to the exact kNN, compiling the wrong kernels)
    centers = 2 * rng.standard_normal((hkv, 40, d))
    keys = (np.take_along_axis(centers, rng.integers(0, 40, (hkv, n, 1)), axis=1)
            + 0.5 * rng.standard_normal((hkv, n, d))).astype(np.float32)
    values = rng.standard_normal((hkv, n, d)).astype(np.float32)
    queries = (np.repeat(keys, hq // hkv, axis=0) + 0.5 * rng.standard_normal((hq, n, d))).astype(np.float32)
    q, k1, v1 = (rng.standard_normal(s).astype(np.float32) for s in ((hq, d), (hkv, d), (hkv, d)))
    seconds = {}
    for name in tqdm(names, desc="compile the fast kernels (methods)", disable=not progress):
        t0 = time.perf_counter()
        pq = queries if _methods.get(name).needs_queries else None
        index = _methods.build(name, keys, values, pq, backend="fast")
        index.attend(q)
        index.append(k1, v1)
        index.attend(q)
        seconds[name] = time.perf_counter() - t0
    return seconds


def run(args):
    """``retrokv warmup [--methods ...]`` (the names are checked by the CLI's parser)."""
    seconds = warmup(args.methods)
    print("compiled (or found cached): " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return 0
