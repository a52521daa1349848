"""mkdocs hooks (mkdocs.yml `hooks:`): keep every page of the site free of requests to other hosts.

mkdocs-jupyter writes into each notebook page a MathJax loader (an empty or CDN ``<script src>``) and a
mermaid loader that imports from a CDN when a page has a diagram. The site renders its math with the
vendored KaTeX (docs/assets/katex-init.js) and has no mermaid diagrams, so both blocks are removed.
"""
from __future__ import annotations

import re

# From mkdocs-jupyter's "<!-- Load mathjax -->" to the end of its mermaid block (both in one run).
_NOTEBOOK_LOADERS = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mermaid configuration -->", re.DOTALL)
_MATHJAX_ONLY = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)


def on_post_page(output: str, page, config) -> str:
    if "<!-- Load mathjax -->" in output:
        output, n = _NOTEBOOK_LOADERS.subn("", output, count=1)
        if not n:
            output = _MATHJAX_ONLY.sub("", output, count=1)
    return output
