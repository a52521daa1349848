"""Built-in natural text, available offline on every machine.

The text is Python's own reference documentation (``pydoc_data.topics``): plain English prose with
some code, shipped with every CPython, so prompts of any length up to ~150K tokens can be built
without a network. Topics are taken in sorted order, so a prompt is the same for a given Python.
"""
from __future__ import annotations

import re


def natural_text(min_chars: int = 20_000) -> str:
    """At least ``min_chars`` characters of English prose from the Python reference documentation."""
    if not isinstance(min_chars, int) or min_chars <= 0:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    from pydoc_data.topics import topics

    parts, total = [], 0
    for name in sorted(topics):
        text = re.sub(r"\n{3,}", "\n\n", topics[name]).strip()
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    else:
        raise ValueError(f"the built-in corpus holds {total} characters, fewer than min_chars={min_chars}")
    return "\n\n".join(parts)


def natural_text_ids(tokenizer, n_tokens: int):
    """Exactly ``n_tokens`` token ids of built-in natural text (a list of ints), for ``tokenizer``."""
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    ids = tokenizer(natural_text(6 * n_tokens), add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"could only build {len(ids)} tokens of built-in text, asked for {n_tokens}")
    return list(ids[:n_tokens])
