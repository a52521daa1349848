"""LazyAttention (arXiv 2606.04302): a document KV store reused at any position, by deferred RoPE.

A :class:`DocumentStore` holds ONE physical KV copy per document, prefilled alone from position 0
(document-local RoPE), in a paged pool of B-token blocks (§4; B = 16). :meth:`DocumentStore.request`
lays documents out one after another (document ``d`` at logical offset ``S_d = start + sum_{e<d} L_e``,
the question after them) and returns a :class:`LazyRequest`: a block table and the offsets. The same
physical blocks serve every order and every position; attention re-positions them on the fly
(:meth:`~DocumentStore.prefill_attention` rotates K blocks by ``+S_d`` inside the kernel,
:meth:`~DocumentStore.decode_attention` de-rotates the query by ``-S_d`` once per document).
:meth:`~DocumentStore.block_attention` is the Block-Attention baseline (materialised re-rotated copies).

**Request lifetime.** A :class:`LazyRequest` is bound to the store that made it and to the
*generation* of every document it names (a counter the store bumps each time it stores a document).
Using it after one of its documents was evicted (``capacity_tokens``) or replaced
(``put(..., replace=True)``) raises :class:`StaleRequestError` naming the document, instead of reading
whatever now occupies the freed blocks; a request given to another store raises ``ValueError``.
Make a new request after putting the document again.
"""
from __future__ import annotations

import itertools
import reprlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from . import _validate as V
from ._xp import check_device, device_namespace, resolve_device, to_device, xp
from .backend import impl, resolve

__all__ = ["LazyConfig", "Document", "LazyRequest", "StoreStats", "DocumentStore", "StaleRequestError"]

_STORE_IDS = itertools.count(1)      # a store's identity for its requests (id() can be reused after GC)


class StaleRequestError(ValueError):
    """A :class:`LazyRequest` names a document that was evicted or replaced after the request was made."""


@dataclass(frozen=True)
class LazyConfig:
    """Store settings. ``block``: tokens per physical block (the paper's B = 16; documents are padded
    to whole blocks). ``theta``/``convention``: the model's RoPE (HF Llama: ``"half"``; SmolLM2 theta 1e5).
    ``capacity_tokens``: pool budget in tokens (whole blocks); least-recently-used documents are evicted
    beyond it. ``None``: unbounded."""

    block: int = 16
    theta: float = 10000.0
    convention: str = "half"
    capacity_tokens: int | None = None

    def __post_init__(self):
        # NumPy ints/floats are accepted and stored as Python numbers; bools are refused (True is not a size)
        object.__setattr__(self, "block", V.check_int(self.block, "LazyConfig.block", 1))
        theta = V.check_real(self.theta, "LazyConfig.theta", "a number > 1")
        if not theta > 1 or not np.isfinite(theta):
            raise ValueError(f"LazyConfig.theta must be a finite number > 1, got {self.theta!r}")
        object.__setattr__(self, "theta", theta)
        V.check_convention(self.convention)
        if self.capacity_tokens is not None:
            object.__setattr__(self, "capacity_tokens", V.check_int(
                self.capacity_tokens, "LazyConfig.capacity_tokens", self.block,
                f"None or an int >= block ({self.block})"))


@dataclass(frozen=True)
class Document:
    """One stored document: its key (the token tuple, by default), length and physical blocks.

    ``generation`` is unique within the store: a document put again after an eviction, or replaced,
    is a new generation, which is how a :class:`LazyRequest` notices that it went stale."""

    key: tuple
    length: int
    blocks: tuple                       # physical block ids, in token order
    generation: int = 0
    tokens: tuple = field(default=(), repr=False)   # the token ids it was put with


@dataclass(frozen=True)
class LazyRequest:
    """A request's layout: documents in order, their logical offsets, the block table.

    ``table`` rows are ``(physical block, valid tokens, document index)`` in logical order;
    ``question_start`` is the logical position of the first token after the documents;
    ``rotations`` is what attention rotates each document by: its offset, or 0 for a ``positioned``
    request whose stored keys already sit at their final positions. The arrays are read-only.

    A request is valid only with the store that made it (``store_id``) and while every document it
    names is still stored at the same :attr:`Document.generation`; otherwise the store's attention
    methods and :meth:`~DocumentStore.materialize` raise :class:`StaleRequestError` (evicted or
    replaced document) or ``ValueError`` (another store's request).
    """

    documents: tuple
    offsets: np.ndarray                 # (n_docs,) int64
    table: np.ndarray                   # (nb, 3) int64
    question_start: int
    rotations: np.ndarray               # (n_docs,) int64
    store_id: int = 0                   # the DocumentStore that made it


@dataclass
class StoreStats:
    """Counters: ``put`` calls, ``put`` calls answered from the store, evictions, replacements
    (``put(..., replace=True)``), bytes of KV written into the pool and bytes materialised by the
    Block-Attention baseline."""

    puts: int = 0
    reused: int = 0
    evictions: int = 0
    replaced: int = 0
    bytes_written: int = 0
    bytes_materialized: int = 0


class DocumentStore:
    """Position-agnostic document KV (LazyAttention §3-4): one physical copy per document.

    Args:
        config: :class:`LazyConfig`.
        backend: ``"reference"`` or ``"fast"`` (default: :func:`retrokv.get_backend`).
        device: ``None`` (decided by the first arrays given: CuPy means ``"cuda"``), ``"cpu"`` or
            ``"cuda"`` (``backend="fast"``): the paged pool lives in device memory and prefill/decode run
            the lazy kernels of :mod:`retrokv.fast.cuda.lazy`, RoPE applied in the kernel from each
            document's offset (LazyAttention §3-4). Block tables and offsets stay host integers.

    The pool's shape (layers, KV heads, head_dim) is fixed by the first :meth:`put`.
    """

    def __init__(self, config: LazyConfig | None = None, backend: str | None = None, *, device: str | None = None):
        if config is None:
            config = LazyConfig()
        if not isinstance(config, LazyConfig):
            raise TypeError(f"config must be a LazyConfig, got {type(config).__name__}")
        self.config = config
        self.backend = resolve(backend)
        self._device = check_device(device)
        self._impl = impl(self.backend, "lazy", self._device)      # refuses device='cuda' with the reference
        self._docs: OrderedDict = OrderedDict()          # key -> Document, least recently used first
        self._free: list = []
        self._k = self._v = None                         # (layers, Hkv, n_blocks * B, d)
        self._id = next(_STORE_IDS)                      # stamped on every request this store makes
        self._generation = 0                             # bumped for every document stored
        self.stats = StoreStats()

    @property
    def device(self):
        """``"cpu"`` or ``"cuda"``; ``None`` until the first arrays decide it (``device=None``)."""
        return self._device

    def _on_device(self, **arrays):
        """``arrays`` in the store's namespace; with ``device=None`` the first call decides the device."""
        if self._device is None:
            self._device = resolve_device(None, *arrays.values())
            self._impl = impl(self.backend, "lazy", self._device)
        return [to_device(x, self._device, name) for name, x in arrays.items()]

    def _xp(self):
        return device_namespace() if self._device == "cuda" else np

    # ---- storage -------------------------------------------------------------------------------
    @staticmethod
    def _key(tokens):
        if isinstance(tokens, Document):
            return tokens.key
        if isinstance(tokens, tuple):
            return tokens                                # the token tuple itself, or a caller's own key
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"tokens must be a 1-D sequence of ints, got {arr.dtype} array of shape {arr.shape}")
        return tuple(int(t) for t in arr)

    @staticmethod
    def _tokens(tokens):
        """The token ids as a tuple of ints (``put`` records them to tell documents with one key apart)."""
        arr = np.asarray(tokens.tokens if isinstance(tokens, Document) else tokens)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TypeError(f"tokens must be a 1-D sequence of ints, got {arr.dtype} array of shape {arr.shape}")
        return tuple(int(t) for t in arr)

    def _check_kv(self, keys, values):
        keys, values = V.as_array(keys, "keys"), V.as_array(values, "values")
        keys, values = self._on_device(keys=keys, values=values)
        m = xp(keys)
        keys = m.asarray(keys, dtype=np.float32)
        values = m.asarray(values, dtype=np.float32)
        if keys.ndim == 3 and values.ndim == 3:          # one layer
            keys, values = keys[None], values[None]
        V.check_rank(keys, "keys", (4,), "(layers, Hkv, L, d) or (Hkv, L, d)")
        V.check_rank(values, "values", (4,), "(layers, Hkv, L, dv) like keys")
        if keys.shape[:3] != values.shape[:3]:
            raise ValueError(f"keys and values must agree on (layers, Hkv, L): got {keys.shape[:3]} and {values.shape[:3]}")
        if keys.shape[-1] % 2:
            raise ValueError(f"keys must have an even head_dim for RoPE, got {keys.shape[-1]}")
        V.check_finite(keys, "keys")
        V.check_finite(values, "values")
        if self._k is not None:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3], self._v.shape[3])
            got = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3])
            if got != want:
                raise ValueError(f"(layers, Hkv, d, dv) = {got} differs from the store's {want}")
        return keys, values

    def _allocate(self, n_blocks, shape):
        """Take ``n_blocks`` free physical blocks, evicting LRU documents or growing the pool."""
        cap = self.config.capacity_tokens
        limit = None if cap is None else cap // self.config.block
        if limit is not None and n_blocks > limit:
            raise ValueError(f"a document of {n_blocks} blocks exceeds capacity_tokens={cap}")
        while limit is not None and self.n_blocks_used + n_blocks > limit:
            _, old = self._docs.popitem(last=False)      # requests naming it go stale (generation check)
            self._free.extend(old.blocks)
            self.stats.evictions += 1
        if len(self._free) < n_blocks:
            have = 0 if self._k is None else self._k.shape[2] // self.config.block
            new = max(2 * have, have + n_blocks - len(self._free), 4)
            if limit is not None:
                new = max(min(new, limit), have + n_blocks - len(self._free))
            self._grow(new, shape)
        self._free.sort(reverse=True)                    # low block ids first: a fresh pool stays contiguous
        return tuple(self._free.pop() for _ in range(n_blocks))

    def _grow(self, n_blocks, shape):
        layers, hkv, d, dv = shape
        rows = n_blocks * self.config.block
        m = self._xp()                                   # the pool lives on the store's device
        k = m.zeros((layers, hkv, rows, d), np.float32)
        v = m.zeros((layers, hkv, rows, dv), np.float32)
        have = 0
        if self._k is not None:
            have = self._k.shape[2]
            k[:, :, :have], v[:, :, :have] = self._k, self._v
        self._free.extend(range(have // self.config.block, n_blocks))
        self._k, self._v = k, v

    def put(self, tokens, keys, values, key=None, replace: bool = False) -> Document:
        """Store a document prefilled alone from position 0; a document already stored is reused as is.

        Args:
            tokens: the document's token ids (its identity; ``len(tokens)`` must equal L). A document
                may be empty (L = 0): it occupies no block and adds nothing to attention.
            keys: ``(layers, Hkv, L, d)`` or ``(Hkv, L, d)`` post-RoPE keys at positions ``0 .. L-1``.
            values: same shape as ``keys`` (last axis ``dv``).
            key: an optional identity to use instead of the token tuple: a hashable tuple.
            replace: what to do when ``key`` is already stored with other content (other tokens,
                another length, or KV that differs by more than re-prefill rounding, i.e. a relative
                1e-3). ``False`` (default): raise ``ValueError``, the stored document is never
                silently kept in place of the one given. ``True``: evict the stored document and store
                this one as a new generation; requests made before then become stale
                (:class:`StaleRequestError`). The same content put again is always reused as is.
        """
        replace = V.check_bool(replace, "replace")
        if key is not None:
            # get/request/`in` read a tuple as a key and anything else as tokens: any other key type
            # could be stored but never found again
            if not isinstance(key, tuple):
                raise TypeError(f"key must be a tuple (or None: the token tuple), got {type(key).__name__}")
            try:
                hash(key)
            except TypeError:
                raise TypeError(f"key must be a hashable tuple, got {reprlib.repr(key)}") from None
        key = self._key(tokens) if key is None else key
        toks = self._tokens(tokens)
        keys, values = self._check_kv(keys, values)
        length = keys.shape[2]
        if len(toks) != length:
            raise ValueError(f"keys hold L={length} tokens but tokens has {len(toks)}")
        b = self.config.block
        n_blocks = -(-length // b)
        cap = self.config.capacity_tokens
        if cap is not None and n_blocks > cap // b:      # before a replace evicts anything
            raise ValueError(f"a document of {n_blocks} blocks exceeds capacity_tokens={cap}")
        self.stats.puts += 1
        old = self._docs.get(key)
        if old is not None:
            why = self._differs(old, toks, keys, values)
            if not why or not replace:
                if why:
                    raise ValueError(f"key {reprlib.repr(key)} is already stored with {why}; pass replace=True "
                                     "to replace it (requests made before then become stale)")
                self.stats.reused += 1
                self._docs.move_to_end(key)
                return old
            del self._docs[key]                          # replace: free its blocks, new generation below
            self._free.extend(old.blocks)
            self.stats.replaced += 1
        shape = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3])
        if self._k is None:
            self._grow(0, shape)                         # fix the pool's shape even for an empty document
        blocks = self._allocate(n_blocks, shape)
        for i, phys in enumerate(blocks):
            n = min(b, length - i * b)
            self._k[:, :, phys * b:phys * b + n] = keys[:, :, i * b:i * b + n]
            self._v[:, :, phys * b:phys * b + n] = values[:, :, i * b:i * b + n]
        self._generation += 1
        doc = Document(key=key, length=length, blocks=blocks, generation=self._generation, tokens=toks)
        self._docs[key] = doc
        self.stats.bytes_written += keys.nbytes + values.nbytes
        return doc

    def _rows(self, doc):
        """Pool rows of a stored document, in token order: ``(L,)`` int64."""
        b = self.config.block
        return np.concatenate([np.arange(p * b, p * b + min(b, doc.length - i * b)) for i, p in enumerate(doc.blocks)]
                              or [np.zeros(0, np.int64)]).astype(np.int64)

    def _differs(self, old, toks, keys, values):
        """Why ``(toks, keys, values)`` is not the stored document ``old`` (``""`` when it is).

        KV may differ by re-prefill rounding (another batch size, another kernel); anything beyond a
        relative 1e-3 of the stored magnitudes is another document under the same key."""
        if old.length != keys.shape[2]:
            return f"length {old.length}, not {keys.shape[2]}"
        if old.tokens != toks:
            return "other tokens"
        m = xp(self._k)
        rows = m.asarray(self._rows(old))
        for name, pool, new in (("keys", self._k, keys), ("values", self._v, values)):
            stored = pool[:, :, rows]
            if stored.size and float(m.abs(stored - new).max()) > 1e-3 * max(float(m.abs(stored).max()), 1e-6):
                return f"other {name} (max difference {float(m.abs(stored - new).max()):.3g})"
        return ""

    def get(self, tokens):
        """The stored :class:`Document` for ``tokens`` (or a key), or ``None``; marks it recently used."""
        key = self._key(tokens)
        doc = self._docs.get(key)
        if doc is not None:
            self._docs.move_to_end(key)
        return doc

    def read(self, tokens):
        """Copies of a stored document's KV as stored (document-local RoPE): ``(keys, values)``,
        each ``(layers, Hkv, L, d)``. Raises ``KeyError`` if it is not stored."""
        doc = self.get(tokens)
        if doc is None:
            raise KeyError("tokens: document not in the store")
        rows = xp(self._k).asarray(self._rows(doc))      # empty for an empty document: (layers, Hkv, 0, d)
        return self._k[:, :, rows], self._v[:, :, rows]

    def __contains__(self, tokens):
        return self._key(tokens) in self._docs

    def __len__(self):
        return len(self._docs)

    @property
    def n_blocks_used(self):
        return sum(len(d.blocks) for d in self._docs.values())

    @property
    def nbytes(self):
        """Bytes of KV held for the stored documents (valid tokens only, all layers, K and V)."""
        if self._k is None:
            return 0
        per_token = self._k.shape[0] * self._k.shape[1] * (self._k.shape[3] + self._v.shape[3]) * 4
        return per_token * sum(d.length for d in self._docs.values())

    def position_aware_nbytes(self, requests):
        """Bytes a position-aware cache (one copy per distinct (document, offset)) needs to serve ``requests``."""
        if self._k is None:
            return 0
        per_token = self._k.shape[0] * self._k.shape[1] * (self._k.shape[3] + self._v.shape[3]) * 4
        seen = {(d.key, int(o)): d.length for r in requests for d, o in zip(r.documents, r.offsets)}
        return per_token * sum(seen.values())

    # ---- requests and attention ------------------------------------------------------------------
    def request(self, documents, start=0, positioned=False) -> LazyRequest:
        """Lay out stored documents in order from logical position ``start`` (e.g. after a preamble).

        ``documents``: token sequences, keys or :class:`Document` objects, all stored. With
        ``positioned=True`` the stored keys already carry their final positions (a position-aware
        cache of materialised copies): offsets are still reported but no rotation is applied.
        """
        pos = V.check_int(start, "start", 0)
        positioned = V.check_bool(positioned, "positioned")
        if isinstance(documents, (str, bytes, Document)) or not hasattr(documents, "__iter__"):
            raise TypeError(f"documents must be a sequence of stored documents (token sequences, keys or "
                            f"Documents), got {type(documents).__name__}")
        docs, offsets, rows = [], [], []
        for i, item in enumerate(documents):
            doc = self.get(item)
            if doc is None:
                raise KeyError(f"documents[{i}] is not in the store (put it first)")
            if isinstance(item, Document) and item.generation != doc.generation:
                raise StaleRequestError(f"documents[{i}] (key {reprlib.repr(item.key)}) is an older copy: the "
                                        "store has replaced or re-put it since; pass the key or the new Document")
            docs.append(doc)
            offsets.append(pos)
            b = self.config.block
            rows += [(phys, min(b, doc.length - j * b), i) for j, phys in enumerate(doc.blocks)]
            pos += doc.length
        table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        offs = np.asarray(offsets, dtype=np.int64)
        rot = np.zeros_like(offs) if positioned else offs.copy()
        for a in (table, offs, rot):
            a.setflags(write=False)                      # the kernels trust the table: no edits after the checks
        return LazyRequest(documents=tuple(docs), offsets=offs, table=table, question_start=pos,
                           rotations=rot, store_id=self._id)

    def _check_request(self, request):
        """Refuse a request that is not this store's, or that names an evicted or replaced document."""
        if not isinstance(request, LazyRequest):
            raise TypeError(f"request must be a LazyRequest from DocumentStore.request, got {type(request).__name__}")
        if request.store_id != self._id:
            raise ValueError("request was made by another DocumentStore: a request is bound to the store that "
                             "made it (its block table indexes that store's pool)")
        for i, doc in enumerate(request.documents):
            now = self._docs.get(doc.key)
            if now is None or now.generation != doc.generation:
                how = "evicted" if now is None else "replaced"
                raise StaleRequestError(f"request is stale: documents[{i}] (key {reprlib.repr(doc.key)}) was {how} "
                                        "after the request was made; put it again and make a new request")

    def _run(self, fn, request, q, k, v, layer, decode):
        self._check_request(request)
        layer = V.check_int(layer, "layer", 0)
        q, k, v = V.check_qkv(q, k, v)
        q, k, v = self._on_device(q=q, k=k, v=v)
        m = xp(q)
        if (q.ndim == 2) != decode:
            raise ValueError(f"q must have shape {'(Hq, d)' if decode else '(Hq, T, d)'}, got {tuple(q.shape)}")
        if not decode and q.shape[1] > k.shape[1]:
            raise ValueError(f"the tail must hold the T={q.shape[1]} query tokens, got M={k.shape[1]} keys")
        c = self.config
        if self._k is None:                              # nothing stored yet: the tail alone
            if len(request.table):
                raise ValueError("request refers to documents but the store is empty")
            pool_k = m.zeros((k.shape[0], 0, k.shape[2]), np.float32)
            pool_v = m.zeros((v.shape[0], 0, v.shape[2]), np.float32)
        else:
            V.check_index(layer, "layer", self._k.shape[0], "a stored layer")
            if (k.shape[0], k.shape[2], v.shape[2]) != (self._k.shape[1], self._k.shape[3], self._v.shape[3]):
                raise ValueError(f"k/v (Hkv, d, dv) = {(k.shape[0], k.shape[2], v.shape[2])} differ from the "
                                 f"store's {(self._k.shape[1], self._k.shape[3], self._v.shape[3])}")
            pool_k, pool_v = self._k[layer], self._v[layer]
        fn = getattr(self._impl, fn)                     # after _on_device: the device's kernels
        return fn(m.asarray(q, dtype=np.float32), m.asarray(k, dtype=np.float32), m.asarray(v, dtype=np.float32),
                  pool_k, pool_v, np.array(request.table), np.array(request.rotations), c.block, c.theta,
                  c.convention)

    def prefill_attention(self, request, q, k, v, layer=0):
        """Lazy prefill: ``q (Hq, T, d)`` at logical positions attends to every document (keys rotated
        by their offset inside the loop, §4) and causally to the tail ``k, v (Hkv, M, d)``, M >= T,
        whose last T tokens are the queries. Returns ``(Hq, T, dv)``."""
        return self._run("lazy_prefill_attention", request, q, k, v, layer, False)[0]

    def decode_attention(self, request, q, k, v, layer=0):
        """Lazy decode: ``q (Hq, d)`` de-rotated once per document (``R(-S_d) q``, §4) against the stored
        keys, plus every tail token ``k, v (Hkv, M, d)`` (M may be 0). Returns ``(Hq, dv)``."""
        return self._run("lazy_decode_attention", request, q, k, v, layer, True)[0]

    def block_attention(self, request, q, k, v, layer=0):
        """Block-Attention baseline: materialise re-rotated copies, then ordinary attention; ``q`` is
        ``(Hq, T, d)`` (causal tail) or ``(Hq, d)``. Equal to the lazy methods up to float rounding."""
        out = self._run("block_attention", request, q, k, v, layer, np.ndim(q) == 2)[0]
        self.stats.bytes_materialized += self._materialized_bytes(request)   # counted once it succeeded
        return out

    def materialize(self, request, layer=0):
        """Block-Attention's copies for one layer: ``(k (Hkv, L, d), v (Hkv, L, dv))`` at logical positions."""
        self._check_request(request)
        if self._k is None:
            raise ValueError("the store is empty: put a document first (the pool's shape is unknown)")
        layer = V.check_index(layer, "layer", self._k.shape[0], "a stored layer")
        self.stats.bytes_materialized += self._materialized_bytes(request)
        c = self.config
        return self._impl.materialize(self._k[layer], self._v[layer], np.array(request.table),
                                      np.array(request.rotations), c.block, c.theta, c.convention)

    def _materialized_bytes(self, request):
        n = int(request.table[:, 1].sum()) if len(request.table) else 0
        return 0 if self._k is None else n * self._k.shape[1] * (self._k.shape[3] + self._v.shape[3]) * 4
