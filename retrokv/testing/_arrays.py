"""Array plumbing of the testing kit: any array type in, float NumPy out, and low-precision rounding.

The kit judges kernels written in any framework, so every public function first brings its arrays to
NumPy here: torch tensors (on any device, with grad, in bfloat16 too, via ``.float()``), CuPy arrays
(``.get()``), NumPy arrays (ml_dtypes' bfloat16 included). Nothing here imports torch, CuPy or
ml_dtypes at module import time.
"""
from __future__ import annotations

import numpy as np

# eps (the gap between 1 and the next float) of each precision the kit can judge
EPS = {"float64": float(np.finfo(np.float64).eps), "float32": float(np.finfo(np.float32).eps),
       "float16": float(np.finfo(np.float16).eps), "bfloat16": 2.0 ** -7}
PRECISIONS = tuple(EPS)


def _module(x):
    return type(x).__module__.split(".")[0]


def precision_of(x) -> str:
    """The precision name of an array's dtype: ``"float64" | "float32" | "float16" | "bfloat16"``."""
    mod = _module(x)
    if mod == "torch":
        name = str(x.dtype).split(".")[-1]          # torch.bfloat16 -> "bfloat16"
    else:
        name = str(getattr(x, "dtype", np.asarray(x).dtype))   # NumPy, CuPy, ml_dtypes' "bfloat16"
    if name not in EPS:
        raise TypeError(f"expected a floating array (float64, float32, float16 or bfloat16), got dtype {name}")
    return name


def precision_name(dtype) -> str:
    """Normalise a dtype given as a string, NumPy dtype, torch dtype or ml_dtypes type to a precision name."""
    if isinstance(dtype, str):
        name = dtype.split(".")[-1]
    elif _module(dtype) == "torch":
        name = str(dtype).split(".")[-1]
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
               "float": "float32", "double": "float64", "fp64": "float64"}
    name = aliases.get(name, name)
    if name not in EPS:
        raise ValueError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    return name


def to_numpy(x, name="array", dtype=np.float64):
    """``x`` (NumPy, torch, CuPy; any float precision) as a NumPy array of ``dtype`` (a copy when needed)."""
    mod = _module(x)
    if mod == "torch":
        x = x.detach()
        if x.dtype.is_floating_point and x.dtype not in _torch_native():
            x = x.float()                           # bfloat16 (and fp8) have no NumPy dtype
        x = x.cpu().numpy()
    elif mod == "cupy":
        x = x.get()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy, torch or CuPy array, got {type(x).__name__}")
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return np.asarray(x.astype(np.float32) if x.dtype.name == "bfloat16" else x, dtype=dtype)


def _torch_native():
    import torch

    return (torch.float64, torch.float32, torch.float16)


def round_bfloat16(x):
    """Round float32 values to the nearest bfloat16 (ties to even) and return them as float32.

    bfloat16 is the top 16 bits of a float32. With ``ml_dtypes`` installed its cast is used;
    otherwise the same rounding is done on the bit pattern: add ``0x7FFF`` plus the lowest kept bit
    (so a tie rounds to the even neighbour), then clear the low 16 bits. NaN stays NaN and overflow
    goes to inf, as in hardware.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    if ml_dtypes is not None:
        return x.astype(ml_dtypes.bfloat16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)          # uint64: the carry of the rounding cannot wrap
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, rounded)


def round_to(x, precision):
    """``x`` rounded through ``precision`` and returned as float32 (float64 for ``"float64"``).

    This is how the kit emulates a float16 or bfloat16 computation on a CPU: round the inputs and the
    output through the low precision, compute in between in float32.
    """
    if precision == "float64":
        return np.asarray(x, np.float64)
    x = np.asarray(x, np.float32)
    if precision == "float32":
        return x
    if precision == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if precision == "bfloat16":
        return round_bfloat16(x)
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
