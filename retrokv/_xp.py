"""Where an index lives: the ``device=`` choice of the public classes and the array namespace it implies.

``device="cpu"`` keeps the KV in NumPy arrays (Numba or NumPy kernels); ``device="cuda"`` keeps it in
device arrays (CuPy on a GPU) and runs the kernels of :mod:`retrokv.fast.cuda`. ``device=None`` infers
the choice from the input: a CuPy array means ``"cuda"``, anything else ``"cpu"`` (DESIGN.md, *the
backend contract*: the array type decides, and nothing falls back silently from the GPU to the CPU).

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the "device arrays" are NumPy arrays, which
is how CI runs the CUDA path of the public classes without a GPU; :func:`device_namespace` says which.
"""
from __future__ import annotations

import numpy as np

__all__ = ["DEVICES", "is_cupy", "on_gpu", "xp", "check_device", "resolve_device", "device_namespace", "to_device",
           "to_host"]

DEVICES = ("cpu", "cuda")


def is_cupy(x) -> bool:
    """True for a CuPy array, without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def on_gpu(x) -> bool:
    """True for a CuPy array or a torch tensor on a CUDA device (it crosses to CuPy by DLPack)."""
    if is_cupy(x):
        return True
    return type(x).__module__.split(".")[0] == "torch" and getattr(x, "device", None) is not None \
        and x.device.type == "cuda"


def xp(*arrays):
    """:mod:`cupy` when any of ``arrays`` is a CuPy array, else :mod:`numpy` (CuPy is imported only then)."""
    return __import__("cupy") if any(is_cupy(a) for a in arrays) else np


def check_device(device, argname="device"):
    """``None``, ``"cpu"`` or ``"cuda"``; anything else is a ``ValueError`` that names the argument."""
    if device is not None and (not isinstance(device, str) or device not in DEVICES):
        raise ValueError(f"{argname} must be None (infer from the arrays), 'cpu' or 'cuda', got {device!r}")
    return device


def resolve_device(device, *arrays, argname="device"):
    """The device an index lives on: ``device`` when given, else ``"cuda"`` for CuPy input, else ``"cpu"``.

    CuPy (or CUDA torch) input with ``device="cpu"`` is refused: the public layer never copies device arrays to the
    host behind the caller's back (pass ``cupy.asnumpy(x)`` to mean it).
    """
    device = check_device(device, argname)
    gpu = any(on_gpu(a) for a in arrays)
    if device is None:
        return "cuda" if gpu else "cpu"
    if device == "cpu" and gpu:
        raise ValueError(f"{argname}='cpu' but the arrays are CuPy (GPU) arrays; pass device='cuda' (or None) "
                         "to keep them on the GPU, or copy them to the host yourself with cupy.asnumpy")
    return device


def device_namespace():
    """The namespace of device arrays: CuPy on a GPU, NumPy under Numba's CUDA simulator."""
    from retrokv.fast.cuda._xp import device_xp    # imports numba.cuda: only on the CUDA path

    try:
        return device_xp()
    except ImportError as e:
        raise ImportError("device='cuda' needs CuPy and an NVIDIA GPU (pip install cupy-cuda12x, or the "
                          "build for your CUDA), or NUMBA_ENABLE_CUDASIM=1 to run the CUDA kernels in Numba's "
                          f"simulator on NumPy arrays ({e})") from e


def to_device(x, device, name="array"):
    """``x`` in ``device``'s namespace. For ``"cuda"`` a host array is uploaded (the caller asked for
    the GPU: this is the build's one host-to-device copy); for ``"cpu"`` a CuPy array is refused."""
    if device == "cuda":
        return device_namespace().asarray(x)
    if is_cupy(x):
        raise ValueError(f"{name} is a CuPy (GPU) array but this index lives on the CPU (device='cpu'); "
                         "build it with device='cuda', or pass cupy.asnumpy(x)")
    return x


def to_host(x):
    """A host (NumPy) value of ``x``: for statistics and the CPU control plane, never for the KV itself."""
    if isinstance(x, (list, tuple)):
        return type(x)(to_host(a) for a in x)
    return x.get() if is_cupy(x) else np.asarray(x)
