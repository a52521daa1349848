"""Sparsity and OOD measurements: bounds and behaviour on data where the answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from retrokv.harness.analysis import ivf_recall_curve, mass_fraction, ood_distances


def test_mass_fraction_bounds_and_a_one_hot_case(rng):
    q = rng.standard_normal((4, 50, 8)).astype(np.float32)
    k = rng.standard_normal((2, 50, 8)).astype(np.float32)
    frac = mass_fraction(q, k, np.arange(40, 50))
    assert frac.shape == (4, 10) and (frac > 0).all() and (frac <= 1).all()
    assert (mass_fraction(q, k, [49], mass=1.0) == 1).all()
    # one key that dominates every score: a single key holds 90% of the mass
    k[:, 7] = 0
    q[:] = 0
    k[:, 7, 0], q[..., 0] = 100.0, 1.0
    assert np.allclose(mass_fraction(q, k, [49]), 1 / 50)
    with pytest.raises(ValueError, match="positions"):
        mass_fraction(q, k, [50])


def test_ood_distances_see_a_shifted_query_distribution(rng):
    k = rng.standard_normal((1, 600, 8)).astype(np.float32)
    q = (rng.standard_normal((2, 600, 8)) + 6.0).astype(np.float32)       # far from the keys
    dist = ood_distances(q, k, 400)
    assert dist[0, 1] > 4 * dist[0, 0]


def test_ivf_recall_rises_with_the_scan_and_is_exact_when_everything_is_scanned(rng):
    keys = rng.standard_normal((800, 16)).astype(np.float32)
    probes = rng.standard_normal((10, 16)).astype(np.float32)
    curve = ivf_recall_curve(keys, probes, [0.05, 0.2, 0.5, 1.0], k=20)
    assert (np.diff(curve) >= 0).all() and curve[-1] == 1.0 and curve[0] < 1.0
