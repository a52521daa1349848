"""Built-in natural text, available offline on every machine, in two corpora of different kinds.

* ``"pydoc"`` (the default): Python's own reference documentation (``pydoc_data.topics``), plain
  English prose with some code, shipped with every CPython, so prompts of any length up to ~150K
  tokens can be built without a network. Topics are taken in sorted order, so a prompt is the same
  for a given Python.
* ``"licenses"``: **legal prose**, held out from the documentation: the licence texts that the
  installed distributions ship in their metadata (``*.dist-info/**/LICENSE*``, ``COPYING*``,
  ``NOTICE*``, read with :mod:`importlib.metadata`). Near-duplicates (the many BSD/MIT/Apache
  copies that differ only in their copyright line) are dropped: two texts whose first 60 words,
  copyright lines removed, agree count once. Longest first, then by distribution and path, so the
  long distinctive texts (GPL-3.0, Apache-2.0 with LLVM exceptions, the PSF licence history, ...)
  open every prompt. The texts are licences, redistributable verbatim by their own terms; the
  corpus depends on the installed environment, which ``constraints.txt`` pins (with the ``hf``
  extra, torch's bundled third-party licences alone give ~170K characters, ~38K tokens).
  :func:`corpus_fingerprint` names the exact text a result was measured on.

Neither corpus is tuned on: benchmarks report both so that no setting is fit to one text.
"""
from __future__ import annotations

import functools
import hashlib
import re

CORPORA = ("pydoc", "licenses")


def _check_corpus(corpus):
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")


def _pydoc_parts():
    from pydoc_data.topics import topics

    return [re.sub(r"\n{3,}", "\n\n", topics[name]).strip() for name in sorted(topics)]


def _license_parts():
    import importlib.metadata as md

    items = []
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        for f in dist.files or ():
            path = str(f)
            base = path.lower().rsplit("/", 1)[-1]
            if ".dist-info/" not in path.lower() or not base.startswith(("license", "copying", "notice")):
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            if text and len(text) >= 500:
                items.append((name, path, re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n")).strip()))
    items.sort(key=lambda x: (-len(x[2]), x[0], x[1]))
    seen, parts = set(), []
    for _, _, text in items:
        body = " ".join(line for line in text.splitlines() if "copyright" not in line.lower())
        key = " ".join(body.split()[:60]).lower()
        if key not in seen:
            seen.add(key)
            parts.append(text)
    return parts


@functools.lru_cache(maxsize=None)
def _cached_parts(corpus):
    return tuple(_pydoc_parts() if corpus == "pydoc" else _license_parts())


def _parts(corpus):
    """The corpus's documents, in order (read once per process: the installed packages do not change)."""
    _check_corpus(corpus)
    return _cached_parts(corpus)


def natural_text(min_chars: int = 20_000, corpus: str = "pydoc") -> str:
    """At least ``min_chars`` characters of English prose from ``corpus`` (see :data:`CORPORA`)."""
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars <= 0:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    parts, total = [], 0
    for text in _parts(corpus):
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    else:
        raise ValueError(f"the built-in corpus {corpus!r} holds {total} characters, fewer than min_chars={min_chars}")
    return "\n\n".join(parts)


def corpus_fingerprint(corpus: str = "pydoc") -> str:
    """The first 12 hex digits of the SHA-256 of the whole corpus text: which text a result used."""
    return hashlib.sha256("\n\n".join(_parts(corpus)).encode()).hexdigest()[:12]


def natural_text_ids(tokenizer, n_tokens: int, corpus: str = "pydoc"):
    """Exactly ``n_tokens`` token ids of built-in natural text from ``corpus`` (a list of ints)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    _check_corpus(corpus)
    ids = tokenizer(natural_text(min(6 * n_tokens, _total(corpus)), corpus), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"could only build {len(ids)} tokens of built-in text {corpus!r}, asked for {n_tokens}")
    return list(ids[:n_tokens])


def _total(corpus):
    return sum(map(len, _parts(corpus)))
