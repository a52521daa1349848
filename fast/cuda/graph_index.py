"""RetrievalAttention on a GPU: CPU–GPU co-execution, as the paper runs it (arXiv 2409.10516, §3.3, App. B).

RetrievalAttention keeps only the static tokens (the first 128 and the last 512) on the GPU and
offloads every other key and value to host memory, where the attention-aware graph index lives. One
decode step runs two partial attentions at the same time: FlashAttention over the static set ``W`` on
the GPU, and graph search plus attention over the retrieved set ``Omega`` on the CPU (search threads
per head). The two partials are disjoint, so the log-sum-exp merge of App. B combines them exactly.

So there is no CUDA graph search here, on purpose: :func:`co_attention` is the GPU half plus the
merge, and it calls the CPU half (the existing Numba search and attention, :mod:`retrokv.fast.graph_index`)
in between. The graph build and search functions themselves refuse CuPy arrays with a ``TypeError``
saying so (:func:`graph_search`, :func:`build_graph` here, and ``retrokv.fast``'s own).
"""
from __future__ import annotations

from ._xp import asnumpy, xp
from .attention import merge_partials, partial_attention

__all__ = ["co_attention", "graph_search", "build_graph", "CPU_ONLY"]

CPU_ONLY = ("RetrievalAttention (arXiv 2409.10516, §3.3) runs graph build and graph search on the CPU, "
            "over KV offloaded to host memory, while the GPU attends the static tokens; pass NumPy arrays "
            "(cupy.asnumpy) and combine the two halves with retrokv.fast.cuda.graph_index.co_attention")


def co_attention(q, static_k, static_v, cpu_partial, scale=None):
    """One decode step of RetrievalAttention's co-execution: ``(out, lse)`` over ``static ∪ retrieved``.

    Args:
        q: ``(Hq, d)`` decode queries (CuPy on a GPU).
        static_k, static_v: ``(Hkv, S, d)``, ``(Hkv, S, dv)``: the static tokens (sinks + window) on the device.
        cpu_partial: ``f(q_host) -> (out (Hq, dv), lse (Hq,))`` in NumPy: graph search and attention over the
            retrieved keys on the CPU (for example ``GraphIndex`` search + ``retrokv.fast.partial_attention``).
            Its key set must be disjoint from the static tokens.
        scale: score scale, default ``1 / sqrt(d)``.

    The query is copied to the host first; then the static-token kernels are launched, and on a GPU
    they run while ``cpu_partial`` works on the CPU (a kernel launch does not wait); the CPU partial
    (``Hq x (dv + 1)`` floats) is copied up and merged by the LSE-merge kernel.
    """
    q_host = asnumpy(q)                                      # before the launch: this copy waits for the device
    gpu_part = partial_attention(q, static_k, static_v, scale=scale)
    out, lse = cpu_partial(q_host)                           # CPU: runs alongside the GPU kernels
    m = xp(q, static_k)
    return merge_partials([gpu_part, (m.asarray(out), m.asarray(lse))])


def graph_search(*args, **kwargs):
    """Refused on the GPU: the paper searches the graph on the CPU (see :data:`CPU_ONLY`)."""
    raise TypeError(CPU_ONLY)


def build_graph(*args, **kwargs):
    """Refused on the GPU: the paper builds the graph on the CPU (see :data:`CPU_ONLY`)."""
    raise TypeError(CPU_ONLY)
