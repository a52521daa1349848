"""Describe the machine a benchmark ran on, for the header of its table."""
from __future__ import annotations

import os
import platform
import time


def describe() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numpy as np

    parts = [f"{cpu}", f"{os.cpu_count()} logical cores", f"Python {platform.python_version()}", f"NumPy {np.__version__}"]
    try:
        import numba

        parts.append(f"Numba {numba.__version__} ({numba.get_num_threads()} threads)")
    except ImportError:
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        parts.append(f"{kb / 2**20:.0f} GiB RAM")
    except (OSError, ValueError, IndexError):
        pass
    return ", ".join(parts)


def best_of(fn, repeats):
    """Fastest of ``repeats`` timed calls of ``fn`` after one untimed warm-up (compilation, page faults)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def write_report(path, lines, show=8):
    """Write the markdown ``lines`` to ``path``, print the last ``show`` of them and where they went."""
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines[-show:]))
    print(f"wrote {path}")
