"""FlashAttention-style closeness: judge a kernel's error by what its precision can achieve.

A fixed ``atol`` is either too loose for float32 or too tight for bfloat16, and it knows nothing of the
inputs (a 100-wide score range is much harder than a 1-wide one). FlashAttention's tests
(``tests/test_flash_attn.py``) instead compute three outputs on the same inputs:

* the **oracle**: attention in high precision (here float64);
* a **same-precision reference**: a plain, trusted implementation run in the kernel's own precision;
* the **tested output**;

and require ``max|out - oracle| <= factor * max|reference - oracle|``: the kernel may be a small
multiple worse than a straightforward implementation at its precision, never more. Here the
reference is retrokv's NumPy reference attention. float16 and bfloat16 are emulated on the CPU by
rounding the inputs and the output through that precision (computing in float32 in between, as
tensor cores accumulate); bfloat16 rounding uses ``ml_dtypes`` when installed and otherwise the
round-to-nearest-even of the top 16 bits of a float32, in NumPy. A small absolute floor covers the
cases where the reference happens to be (nearly) exact: one unit in the last place of ``max |v|``, plus
what float32 rounding of the scores alone can move the output by.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import EPS, precision_name, precision_of, round_to, to_numpy
from .oracles import _check_shapes, _oracle, attention_oracle

__all__ = ["assert_attention_close", "attention_close", "Comparison", "CloseReport"]


@dataclass(frozen=True)
class Comparison:
    """The verdict on one array (``out`` or ``lse``): errors against the truth and the bound they met or missed."""

    what: str                 # "out" or "lse"
    precision: str            # precision the array was judged as
    max_error: float          # max |tested - truth| (inf for NaN or a wrong -inf)
    mean_error: float         # mean |tested - truth| over the finite entries
    reference_error: float    # max |reference - truth|: what the precision achieves on these inputs
    factor: float
    floor: float
    bound: float              # factor * reference_error + floor
    worst: tuple              # index of the largest error
    n_over: int               # entries whose error exceeds the bound
    size: int

    @property
    def passed(self) -> bool:
        return self.max_error <= self.bound


@dataclass(frozen=True)
class CloseReport:
    """Returned by :func:`assert_attention_close` (and :func:`attention_close`): one :class:`Comparison`
    for ``out`` and one for ``lse`` when it was given; ``message`` is the text an assertion would raise."""

    out: Comparison
    lse: Comparison | None
    message: str

    @property
    def passed(self) -> bool:
        return self.out.passed and (self.lse is None or self.lse.passed)


def _pair(result, name):
    if isinstance(result, (tuple, list)) and len(result) == 2:
        return to_numpy(result[0], f"{name}'s out"), to_numpy(result[1], f"{name}'s lse")
    return to_numpy(result, f"{name}'s out"), None


def _errors(x, truth):
    """|x - truth| with NaN and a -inf/finite mismatch as inf; matching -inf entries count 0."""
    with np.errstate(invalid="ignore"):
        err = np.abs(x - truth)
    both_inf = np.isneginf(x) & np.isneginf(truth)
    err = np.where(both_inf, 0.0, err)
    return np.where(np.isnan(err), np.inf, err)


def _compare(what, x, truth, ref_err, precision, factor, floor):
    err = _errors(x, truth)
    finite = np.isfinite(err)
    bound = factor * ref_err + floor
    if err.size == 0:
        return Comparison(what, precision, 0.0, 0.0, ref_err, factor, floor, bound, (), 0, 0)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    return Comparison(what, precision, float(err.max()), float(err[finite].mean()) if finite.any() else float("inf"),
                      ref_err, factor, floor, bound, tuple(int(i) for i in worst), int((err > bound).sum()), err.size)


def _where(c, shape_q, n_keys, group, causal):
    """'head 3 (KV head 1), query 5 (key position 12), channel 7' for an out/lse index."""
    idx = c.worst
    if not idx:
        return "(empty)"
    parts = [f"head {idx[0]} (KV head {idx[0] // group})"]
    if len(shape_q) == 3:                       # a block of T queries
        t = idx[1]
        pos = n_keys - shape_q[1] + t
        parts.append(f"query {t} (position {pos}" + (f", sees keys 0..{pos})" if causal else ")"))
    if c.what == "out":
        parts.append(f"channel {idx[-1]}")
    return ", ".join(parts)


def _describe(c, x, truth, where, truth_name, ref_name):
    got, want = x[c.worst], truth[c.worst]
    lines = [f"  {c.what}: max |error| {c.max_error:.3g} at {where}: got {got:.6g}, {truth_name} {want:.6g}",
             f"  {c.what}: mean |error| {c.mean_error:.3g}; {c.n_over} of {c.size} entries exceed the bound",
             f"  {c.what}: bound {c.bound:.3g} = {c.factor:g} x reference error {c.reference_error:.3g} "
             f"({ref_name}) + floor {c.floor:.3g}"]
    return lines


def attention_close(out, q, k, v, *, causal=False, scale=None, lse=None, dtype=None, atol_factor=4.0,
                    atol_floor=None, lse_floor=None, reference=None) -> CloseReport:
    """The judgement of :func:`assert_attention_close` as a :class:`CloseReport`, without raising."""
    precision = precision_name(dtype) if dtype is not None else precision_of(out)
    x = to_numpy(out, "out")
    qa, ka, va = to_numpy(q, "q"), to_numpy(k, "k"), to_numpy(v, "v")
    _check_shapes(qa, ka, va)
    group = qa.shape[0] // ka.shape[0]
    vmax = float(np.abs(va).max(initial=0.0))
    rounded = [round_to(a, precision).astype(np.float32) if precision != "float64" else a for a in (qa, ka, va)]

    from retrokv.reference.attention import partial_attention

    def same_precision_reference():
        """retrokv's reference attention in the tested precision, and its name for the message."""
        if precision == "float64":              # the oracle is itself a float64 computation
            o, l = attention_oracle(qa, ka, va, causal, scale)
            return o, l, "float64: the oracle itself"
        o, l = (np.asarray(a, np.float64) for a in partial_attention(*rounded, causal=causal, scale=scale))
        name = f"retrokv's reference attention in {precision}"
        return round_to(o, precision).astype(np.float64), l, name + ("" if precision == "float32" else
                                                                     ": inputs and output rounded")

    if reference is None:
        truth_o, truth_l, smax = _oracle(qa, ka, va, causal, scale)
        truth_name, target = "oracle", "the float64 oracle"
        base_o, base_l = truth_o, truth_l       # the reference's error is measured against the oracle
        ref_o, ref_l, ref_name = same_precision_reference()
    else:
        if causal or scale is not None:
            raise TypeError("with a reference callable, bind causal and scale into it "
                            "(e.g. functools.partial); they only configure the default reference")
        # the expected output: the trusted method on the inputs as the kernel saw them (rounded to its precision)
        truth_o, truth_l = _pair(reference(*(np.ascontiguousarray(a, np.float32) for a in rounded)), "reference")
        truth_name = "reference"
        fn = getattr(reference, "func", reference)                  # see through functools.partial
        target = f"the reference {getattr(fn, '__name__', type(fn).__name__)}"
        # the allowed error: the rounding noise of exact attention at this precision on the same inputs
        base_o, base_l, smax = _oracle(qa, ka, va, False, None)
        ref_o, ref_l, _ = same_precision_reference()
        ref_name = f"rounding noise of exact attention in {precision} on these inputs"

    if x.shape != truth_o.shape:
        raise AssertionError(f"out has shape {x.shape}, expected {truth_o.shape} "
                             f"({'(Hq, dv)' if qa.ndim == 2 else '(Hq, T, dv)'} for q {qa.shape}, v {va.shape})")
    eps = EPS[precision]
    if atol_floor is None:
        # one unit in the last place of the largest value, plus what float32 score rounding alone can
        # move the output by: a dot product q.k is rounded by about eps32 * sum_i |q_i k_i|, which scales
        # that key's weight by as much. The reference can happen to round its scores luckily; a correct
        # kernel summing in another order need not.
        floor = eps * vmax + min(EPS["float32"], eps) * smax * vmax
        floor = max(floor, np.finfo(np.float64).tiny)
    else:
        floor = float(atol_floor)
    ref_err = float(_errors(ref_o, base_o).max(initial=0.0))
    c_out = _compare("out", x, truth_o, ref_err, precision, atol_factor, floor)

    c_lse, xl = None, None
    if lse is not None:
        if truth_l is None:
            raise TypeError("lse was given but the reference returns no lse; return (out, lse) from it")
        lse_precision = precision_of(lse)      # kernels often return a float32 lse with a bf16 out
        xl = to_numpy(lse, "lse")
        if xl.shape != truth_l.shape:
            raise AssertionError(f"lse has shape {xl.shape}, expected {truth_l.shape} (q's shape without head_dim)")
        ref_l = round_to(ref_l, lse_precision).astype(np.float64) if lse_precision != "float64" else ref_l
        fin = np.isfinite(truth_l)
        lmax = float(np.abs(truth_l[fin]).max(initial=0.0))
        lfloor = (EPS[lse_precision] * (1.0 + lmax) + EPS["float32"] * smax) if lse_floor is None else float(lse_floor)
        c_lse = _compare("lse", xl, truth_l, float(_errors(ref_l, base_l).max(initial=0.0)),
                         lse_precision, atol_factor, lfloor)

    failed = [c for c in (c_out, c_lse) if c is not None and not c.passed]
    if not failed:
        return CloseReport(c_out, c_lse, "")
    n_keys = ka.shape[1]
    head = (f"attention {' and '.join(c.what for c in failed)} not close to {target} "
            f"(judged as {precision}; q {tuple(qa.shape)}, k {tuple(ka.shape)}, v {tuple(va.shape)}, "
            f"causal={causal}, scale={'1/sqrt(d)' if scale is None else scale}):")
    lines = [head]
    for c in failed:
        arr, tr = (x, truth_o) if c.what == "out" else (xl, truth_l)
        lines += _describe(c, arr, tr, _where(c, qa.shape, n_keys, group, causal), truth_name, ref_name)
    return CloseReport(c_out, c_lse, "\n".join(lines))


def assert_attention_close(out, q, k, v, *, causal=False, scale=None, lse=None, dtype=None, atol_factor=4.0,
                           atol_floor=None, lse_floor=None, reference=None) -> CloseReport:
    """Assert that ``out`` (and ``lse``) is attention of ``q, k, v`` up to what its precision allows.

    Passes when ``max |out - oracle| <= atol_factor * max |ref - oracle| + atol_floor``, where the
    oracle is float64 attention (:func:`retrokv.testing.oracles.attention_oracle`) and ``ref`` is
    retrokv's reference attention run in ``out``'s precision (float32; float16 and bfloat16 emulated by
    rounding the inputs and the output), as FlashAttention's tests judge their kernels. ``lse`` is
    judged the same way against the oracle's ``log sum exp(q.k * scale)`` (natural log; multiply a
    base-2 LSE by ``ln 2`` first); a row with no visible key must have ``lse = -inf``.

    Args:
        out (array): the tested output, ``(Hq, dv)`` or ``(Hq, T, dv)``: NumPy, torch (any device,
            bfloat16 included) or CuPy.
        q (array): the queries the kernel got, ``(Hq, d)`` or ``(Hq, T, d)`` (retrokv's layout: transpose
            a ``(B, H, T, d)`` tensor to ``(B*H, T, d)`` first).
        k (array): keys ``(Hkv, N, d)``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        v (array): values ``(Hkv, N, dv)``.
        causal (bool): bottom-right aligned causal mask (query ``t`` of T sees keys ``0 .. N - T + t``).
        scale (float | None): score scale, default ``1 / sqrt(d)``.
        lse (array | None): the kernel's log-sum-exp, ``q``'s shape without ``d``; judged in its own precision.
        dtype (str | dtype | None): the precision to judge ``out`` as (default: ``out``'s dtype), e.g.
            ``"bfloat16"`` for a kernel that computes in bfloat16 but returns float32.
        atol_factor (float): how many times the same-precision reference's error the output may have
            (FlashAttention's tests use 2; retrokv's fast-path tests use 4).
        atol_floor (float | None): absolute slack on ``out``; default one unit in the last place of
            ``max |v|`` plus ``eps32 max|v| max_j (scale sum_i |q_i k_ji|)`` over the keys carrying weight
            (what float32 rounding of the scores alone can move the output by).
        lse_floor (float | None): absolute slack on ``lse``; default one unit in the last place of
            ``1 + max |lse|`` plus ``eps32 max_j (scale sum_i |q_i k_ji|)``.
        reference (callable | None): a trusted implementation of a *different* attention (a sparse method), called as
            ``reference(q, k, v)`` on float32 inputs rounded to the tested precision and returning
            ``out`` or ``(out, lse)``: e.g. ``functools.partial(oracles.wave_reference,
            config=cfg)``. ``out`` must then equal it up to ``atol_factor`` times the rounding noise of
            exact attention at that precision on the same inputs, plus the floor.

    Returns:
        A :class:`CloseReport` with the errors and bounds (useful to log how much headroom a kernel has).

    Raises:
        AssertionError: saying what differed (``out`` or ``lse``), where (head, KV head, query, channel),
            by how much (max and mean error, how many entries exceed the bound) and the bound, with the
            reference error it was built from.
    """
    report = attention_close(out, q, k, v, causal=causal, scale=scale, lse=lse, dtype=dtype,
                             atol_factor=atol_factor, atol_floor=atol_floor, lse_floor=lse_floor,
                             reference=reference)
    if not report.passed:
        raise AssertionError(report.message)
    return report
