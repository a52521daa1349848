"""Execute a jupytext tutorial into an .ipynb with outputs (used by the tests and the docs build).

    python tutorials/run.py tutorials/00_attention_is_retrieval.py [--out docs/tutorials] [--small]
"""
from __future__ import annotations

import argparse
import os
import sys


def execute(path: str, out_dir: str, small: bool = True, timeout: int = 900) -> str:
    """Run the percent-format script at ``path`` as a notebook; write ``out_dir/<name>.ipynb``; return its path."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    os.environ["RETROKV_TUTORIAL_SMALL"] = "1" if small else "0"
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    here = os.path.dirname(os.path.abspath(path))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": here}}).execute()
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".ipynb")
    jupytext.write(nb, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "tutorials"))
    ap.add_argument("--full", action="store_true", help="full sizes (default: the small sizes the tests use)")
    args = ap.parse_args()
    for p in args.paths:
        print(execute(p, args.out, small=not args.full), file=sys.stderr)
