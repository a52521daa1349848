"""Execute jupytext tutorials into .ipynb notebooks with outputs (used by `make docs` and by the tests).

    python tutorials/run.py tutorials/0*.py                        # full size, into docs/tutorials (the docs)
    python tutorials/run.py --small --out /tmp/nb tutorials/01_wave_index.py   # the small size the tests run

The executed notebooks in docs/tutorials/ are committed: the docs build renders them without running
anything, so `make test` (which runs every tutorial small, into a temporary folder) stays quick.
The kernel runs quietly: no loader progress bars, no library warnings (retrokv's own warnings still
show); the tests outside the tutorials keep every warning.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DOCS_TUTORIALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "tutorials")

# Environment of the notebook kernel only (not of the process that runs it).
QUIET_ENV = {
    "TQDM_DISABLE": "1",                       # transformers' "Converting and de-quantizing GGUF tensors" bar
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}
# Run by the kernel before the first cell (invisible in the notebook): library warnings off, retrokv's on.
QUIET_LINES = ("import warnings; warnings.filterwarnings('ignore'); "
               "warnings.filterwarnings('default', module=r'retrokv(\\.|$)')")


def execute(path: str, out_dir: str, small: bool = True, timeout: int = 1800) -> str:
    """Run the percent-format script at ``path`` as a notebook; write ``out_dir/<name>.ipynb``; return its path."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    env = {**os.environ, **QUIET_ENV, "RETROKV_TUTORIAL_SMALL": "1" if small else "0"}
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    here = os.path.dirname(os.path.abspath(path))
    t0 = time.time()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": here}},
                            extra_arguments=[f"--IPKernelApp.exec_lines={QUIET_LINES}"])
    client.execute(env=env)
    seconds = round(time.time() - t0)
    nb.metadata["retrokv"] = {"size": "small" if small else "full", "seconds": seconds}
    _strip(nb)
    _size_note(nb, small, seconds)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".ipynb")
    jupytext.write(nb, out)
    return out


def _size_note(nb, small: bool, seconds: int) -> None:
    """Say under the title at which size this copy ran (the size constants are in the first code cell)."""
    size = ("the small size the tests use (`RETROKV_TUTORIAL_SMALL=1`)" if small else
            "full size (`RETROKV_TUTORIAL_SMALL=0`; the sizes are set in the first code cell)")
    note = f"*This copy was executed at {size} by `tutorials/run.py`, in {_duration(seconds)} on a shared 2-core CPU.*"
    cell = nb.cells[0]
    if cell.cell_type == "markdown" and cell.source.startswith("# "):
        title, _, rest = cell.source.partition("\n")
        cell.source = f"{title}\n\n{note}\n{rest}"


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _strip(nb) -> None:
    """Keep committed notebooks small and their diffs quiet: no widget state, no execution timestamps."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--out", default=DOCS_TUTORIALS, help="output folder (default: docs/tutorials)")
    ap.add_argument("--small", action="store_true", help="the small sizes the tests use (default: full sizes)")
    args = ap.parse_args()
    for p in args.paths:
        t0 = time.time()
        out = execute(p, args.out, small=args.small)
        print(f"{out}  ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
