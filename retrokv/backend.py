"""The one ``backend=`` switch: ``"reference"`` (NumPy) or ``"fast"`` (Numba on the CPU, CuPy on the GPU).

The default is ``"reference"`` (it needs nothing beyond NumPy), or the value of the environment
variable ``RETROKV_BACKEND`` when set; :func:`set_backend` changes it for the process.
"""
from __future__ import annotations

import importlib
import os

BACKENDS = ("reference", "fast")
_default = os.environ.get("RETROKV_BACKEND", "reference")


def _check(name, argname="backend"):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argname} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Set the default backend used when a public function is called with ``backend=None``."""
    global _default
    _default = _check(name)


def get_backend() -> str:
    """The current default backend name."""
    return _check(_default, "RETROKV_BACKEND")


def resolve(backend: str | None) -> str:
    """``backend`` itself when given (validated), else the default."""
    return get_backend() if backend is None else _check(backend)


def module(backend: str | None):
    """The implementation package for ``backend``: :mod:`retrokv.reference` or :mod:`retrokv.fast`."""
    name = resolve(backend)
    try:
        return importlib.import_module(f"retrokv.{name}")
    except ImportError as e:  # numba missing
        raise ImportError(f"backend={name!r} needs the 'fast' extra: pip install 'retrokv[fast]' ({e})") from e


def impl(backend: str | None, name: str, device: str | None = None):
    """The module implementing concept ``name`` for ``backend`` on ``device``: ``impl("fast", "wave_index")``
    is :mod:`retrokv.fast.wave_index`, ``impl("fast", "wave_index", "cuda")`` is
    :mod:`retrokv.fast.cuda.wave_index`. The one place the public layer picks an implementation.

    ``device``: ``None`` or ``"cpu"`` (NumPy / Numba) or ``"cuda"`` (the CUDA kernels, ``backend="fast"``
    only: the reference backend is NumPy by definition).
    """
    from ._xp import check_device

    if check_device(device) == "cuda":
        if resolve(backend) != "fast":
            raise ValueError(f"device='cuda' needs backend='fast' (the CUDA kernels live in retrokv.fast.cuda); "
                             f"got backend={resolve(backend)!r}, and the reference backend is NumPy on the CPU")
        try:
            return importlib.import_module(f"retrokv.fast.cuda.{name}")
        except ImportError as e:  # numba (or numba-cuda) missing
            raise ImportError(f"device='cuda' needs numba with its CUDA target: pip install 'retrokv[fast]' "
                              f"numba-cuda ({e})") from e
    return importlib.import_module(f"{module(backend).__name__}.{name}")
