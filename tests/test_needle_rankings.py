"""benchmarks/needle_rankings.py's own rankings, without the model (it takes the library's two from
rank_clusters): their definitions, and its best-key oracle against brute force."""
from __future__ import annotations

import importlib.util
import os

import numpy as np

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "needle_rankings.py")
_spec = importlib.util.spec_from_file_location("needle_rankings", _PATH)
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def _scores(rng, hkv=2, g=3, c=30):
    s = rng.standard_normal((hkv, g, c)) * 3
    s[:, :, 5] = -np.inf                                            # an empty cluster
    return s


def test_group_orders_follow_their_definitions(rng):
    s = _scores(rng)
    orders, own = R.group_orders(s)
    p = np.exp(s - s.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    assert np.array_equal(orders["softmax_max"], np.argsort(-p.max(axis=1), axis=1, kind="stable"))
    for h in range(s.shape[0]):
        assert list(own[h, 0]) == list(np.argsort(-s[h, 0], kind="stable"))
        assert sorted(orders["round_robin"][h]) == list(range(s.shape[2]))          # a permutation
        firsts = [own[h, x, 0] for x in range(s.shape[1])]
        assert list(orders["round_robin"][h][:len(set(firsts))]) == list(dict.fromkeys(firsts))   # heads in turn
        assert orders["softmax_max"][h][-1] == 5 and orders["round_robin"][h][-1] == 5   # the empty cluster last


def test_best_key_order_is_the_brute_force_maximum(rng):
    hkv, g, d, sizes = 2, 3, 8, np.array([[3, 0, 5, 1], [2, 2, 0, 4]])
    offsets = np.concatenate([np.zeros((hkv, 1), np.int64), np.cumsum(sizes, axis=1)], axis=1)
    keys = rng.standard_normal((hkv, int(sizes.sum(axis=1).max()), d))
    qb = rng.standard_normal((hkv, g, d))
    keys[1, -1] = 100 * qb[1, 0]              # head 1 holds 8 keys: its ninth row is padding and must not count
    got = R.best_key_order(qb, keys, offsets, sizes, d)
    for h in range(hkv):
        best = [max((keys[h, j] @ qb[h].T).max() for j in range(offsets[h, i], offsets[h, i + 1]))
                if sizes[h, i] else -np.inf for i in range(sizes.shape[1])]
        assert list(got[h]) == list(np.argsort(-np.array(best), kind="stable"))
