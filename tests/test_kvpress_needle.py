"""benchmarks/kvpress_needle.py's pure logic, without kvpress: the context/question split, the ratio <-> density
map, the scoring rule and the report tables (the measurement itself runs in .venv-kvpress, `make bench-kvpress`)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "kvpress_needle.py")
_spec = importlib.util.spec_from_file_location("kvpress_needle", _PATH)
K = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(K)


def test_kept_tokens_and_density():
    assert K.kept_tokens(8173, 0.0) == 8173 and K.density(8173, 19, 0.0, 7) == 1.0
    # kvpress truncates 1000 * (1 - 0.9) = 99.99999999999997 to 99 and keeps at least one
    assert K.kept_tokens(1000, 0.9) == 99 and K.kept_tokens(1000, 0.5) == 500 and K.kept_tokens(10, 0.99) == 1
    # step j holds kept + question + j of context + question + j tokens
    want = np.mean([(99 + 20 + j) / (1000 + 20 + j) for j in (1, 2, 3)])
    assert K.density(1000, 20, 0.9, 3) == pytest.approx(want)
    ds = [K.density(8173, 19, r, 7) for r in K.RATIOS]
    assert ds == sorted(ds) and len(set(ds)) == len(ds)
    with pytest.raises(ValueError):
        K.kept_tokens(100, 1.0)


def test_default_ratios_land_on_retrokvs_densities():
    targets = (0.053, 0.068, 0.090, 0.095, 0.130, 0.300)
    for r, t in zip(K.RATIOS, targets):
        assert abs(K.density(8173, 19, r, 7) - t) < 0.001
        assert K.ratio_for_density(t, 8173, 19, 7) == r


def test_score_answer_skips_the_leading_space():
    assert K.score_answer([9.0, 0.1, 0.3], [False, True, True]) == (True, pytest.approx(0.2))
    assert K.score_answer([0.0, 0.1, 0.3], [True, True, False])[0] is False


@pytest.mark.model
def test_split_prompt_reproduces_the_prompt(smollm2):
    from retrokv.harness import frontier as F

    _, tok = smollm2
    for n_keys, seed in ((1, 3), (4, 2)):
        s = F.needle_prompt(tok, 300, 0.5, n_keys, "pydoc", seed=seed)
        ctx, q, key = K.split_prompt(tok, s.prompt_ids)
        assert tuple(ctx + q) == s.prompt_ids and len(ctx) + len(q) == 300
        text = tok.decode(q)
        assert text.startswith("\n\nWhat is the special magic number for " + key) and text.endswith("is:")
        assert "One of the special magic numbers for " + key in tok.decode(ctx)   # the needle is in the context
    with pytest.raises(ValueError):
        K.split_prompt(tok, s.prompt_ids[:-1])


def _fake():
    kv, rk = {}, {}
    # kvpress: full right on prompts 0, 1; knorm at two ratios; snapkv only on prompt 0
    for p, ok in ((0, True), (1, True), (2, False)):
        kv[f"f{p}"] = dict(prompt=p, task="t", press="full", ratio=0.0, correct=ok, answer_nll=0.1, density=1.0,
                           kept_context=100, n_context=100)
    for p, ok in ((0, True), (1, False)):
        kv[f"k{p}"] = dict(prompt=p, task="t", press="knorm", ratio=0.9, correct=ok, answer_nll=1.0, density=0.11,
                           kept_context=10, n_context=100)
        kv[f"k5{p}"] = dict(prompt=p, task="t", press="knorm", ratio=0.7, correct=True, answer_nll=0.5, density=0.31,
                            kept_context=30, n_context=100)
    kv["s0"] = dict(prompt=0, task="t", press="snapkv", ratio=0.9, correct=False, answer_nll=2.0, density=0.11,
                    kept_context=10, n_context=100)
    # retrokv: full on 0, 1 (prompt 1 disagrees with kvpress's full), wave on 0, 1, 2
    for p, ok in ((0, True), (1, False)):
        rk[f"f{p}"] = dict(prompt=p, task="t", method="full", knob="dense", value=None, correct=ok, answer_nll=0.2,
                           byte_density=1.0, token_density=1.0)
    for p in (0, 1, 2):
        rk[f"w{p}"] = dict(prompt=p, task="t", method="wave", knob="r=0.04", value=0.04, correct=p != 1,
                           answer_nll=0.3, byte_density=0.09, token_density=0.05)
    # a sanity point at another length: reported apart, never mixed into the 8192-token rows
    for press in ("full", "knorm"):
        kv[f"short_{press}"] = dict(n_tokens=1024, prompt=0, task="t", press=press, ratio=0.0 if press == "full" else 0.9,
                                    correct=True, answer_nll=0.1, density=0.5, kept_context=50, n_context=100)
    return {"needle": kv, "runs": [], "checks": []}, {"needle": rk}


def test_report_tables_on_a_fake_json(tmp_path):
    db, rk = _fake()
    long = [r for r in db["needle"].values() if r.get("n_tokens", K.N) == K.N]
    rows = {(r["press"], r["ratio"]): r for r in K.press_rows(long)}
    assert rows[("knorm", 0.9)]["accuracy"] == 0.5 and rows[("knorm", 0.9)]["full_accuracy"] == 1.0
    assert rows[("knorm", 0.9)]["delta_points"] == pytest.approx(-50)
    assert rows[("snapkv", 0.9)]["prompts"] == 1 and rows[("snapkv", 0.9)]["full_accuracy"] == 1.0
    agree = K.full_agreement(long, list(rk["needle"].values()))
    assert [a["same"] for a in agree] == [True, False]
    sbs = K.side_by_side(long, list(rk["needle"].values()))
    (wave,) = sbs
    knorm, snap = wave["cells"]["knorm"], wave["cells"]["snapkv"]
    assert knorm["ratio"] == 0.9 and knorm["n"] == 2 and knorm["accuracy"] == 0.5    # nearest density, prompts 0-1
    assert knorm["retrokv_accuracy"] == 0.5 and snap["n"] == 1 and snap["retrokv_accuracy"] == 1.0
    assert K.side_by_side(long, list(rk["needle"].values()), max_factor=1.1) == []
    md, _ = K.report_md(db, rk, machine="test machine")
    assert "1 of 2 prompts agree" in md and "MISMATCH" in md and "| knorm | 0.9 | 2 |" in md
    assert "## Sanity: lower compression ratios at 1024 tokens" in md and "| knorm | 0.9 | 1 | 0.500 |" in md
    path = tmp_path / "p.png"
    assert K.common_prompts(long, list(rk["needle"].values())) == [0, 1]
    K.plot(long, list(rk["needle"].values()), str(path))
    assert path.stat().st_size > 0


def test_prompts_file_round_trip_and_tamper_check(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(K, "PROMPTS_DIR", str(tmp_path))
    ps = [{"prompt": i, "task": "t", "depth": 0.5, "answer": "1234567", "ids": [i, 2, 3, 4],
           "sha": K.ids_hash([i, 2, 3, 4])} for i in range(3)]
    with open(K.prompts_path(4), "w") as f:
        json.dump({"prompts": ps, "versions": {}, "fingerprints": {}}, f)
    got, _ = K.load_prompts(4, 2)
    assert [i for i, _ in got] == [0, 1] and got[1][1].prompt_ids == (1, 2, 3, 4)
    with pytest.raises(SystemExit):
        K.load_prompts(4, 5)                      # fewer prompts in the file than asked for
    ps[0]["ids"][1] = 9
    with open(K.prompts_path(4), "w") as f:
        json.dump({"prompts": ps, "versions": {}, "fingerprints": {}}, f)
    with pytest.raises(ValueError):
        K.load_prompts(4, 1)                      # ids no longer match their hash
