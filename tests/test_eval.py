"""retrokv.harness.eval, the CLI and the demo table: synthetic tasks, shared-prefill evaluation, perplexity."""
from __future__ import annotations

import argparse

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.mark.model
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_exact_length_and_the_key_at_its_depth(tok, depth):
    from retrokv.harness.eval import passkey

    s = passkey(tok, 600, depth, seed=3)
    assert len(s.prompt_ids) == 600 and s.answer.isdigit() and len(s.answer) == 5
    text = tok.decode(list(s.prompt_ids))
    assert text.count(s.answer) == 2 and text.rstrip().endswith("The pass key is")
    at = text.index(f"The pass key is {s.answer}") / len(text)
    assert abs(at - depth) < 0.15


@pytest.mark.model
def test_multikey_and_natural_needles(tok):
    from retrokv.harness.eval import FILLER, needle

    multi = needle(tok, 800, 0.3, n_keys=4, seed=1)
    text = tok.decode(list(multi.prompt_ids))
    assert text.count("special magic numbers for") == 4 and text.count(multi.answer) == 1
    asked = text.rsplit("What is the special magic number for ", 1)[1].split("?")[0]
    assert f"for {asked} is: {multi.answer}" in text
    nat = needle(tok, 800, 0.7, haystack="natural", seed=1)
    assert FILLER.split(".")[0] not in tok.decode(list(nat.prompt_ids)) and len(nat.prompt_ids) == 800


def test_task_arguments_are_validated(tok):
    from retrokv.harness.eval import make_samples, needle, passkey

    with pytest.raises(ValueError, match="n_tokens"):
        passkey(tok, 10, 0.5)
    with pytest.raises(ValueError, match="depth"):
        passkey(tok, 512, 1.5)
    with pytest.raises(ValueError, match="haystack"):
        needle(tok, 512, 0.5, haystack="web")
    with pytest.raises(ValueError, match="n_keys"):
        needle(tok, 512, 0.5, n_keys=0)
    with pytest.raises(ValueError, match="task"):
        make_samples(tok, "qa", [512], 1)
    with pytest.raises(ValueError, match="depths"):
        make_samples(tok, "passkey", [512], 1, depths=[0.5, 2.0])
    got = make_samples(tok, "passkey", [512], 2, depths=[0.25, 0.75])
    assert [s.depth for s in got] == [0.25, 0.25, 0.75, 0.75] and len({s.answer for s in got}) == 4


@pytest.mark.model
def test_shared_prefill_methods_agree_with_the_plain_model(smollm2):
    """Plain transformers and retrokv's full attention, decoding from one shared prefill, answer alike;
    an index whose budget covers everything gives the same perplexity; StreamingLLM reads less."""
    from retrokv.harness import eval as E
    from retrokv.baselines import StreamingConfig
    from retrokv.harness.data import natural_text_ids
    from retrokv.wave_index import WaveConfig

    model, tok = smollm2
    samples = E.make_samples(tok, "passkey", [512], 2)
    wide = StreamingConfig(n_sink=4, n_recent=4096)           # a labelled second config: the whole prompt
    methods = ("plain", "full", "streaming", ("wide", "streaming"))
    rows = {r["method"]: r for r in E.run_task(model, tok, samples, methods, configs={"wide": wide},
                                                backend="fast", progress=False)}
    assert rows["plain"]["answers"] == rows["full"]["answers"] == rows["wide"]["answers"]
    assert rows["full"]["density"] == 1.0 and rows["streaming"]["density"] < 0.5
    assert rows["wide"]["density"] == 1.0
    ids = natural_text_ids(tok, 520)
    ppl = E.perplexity(model, ids, 512, ("plain", "full", "wave"), configs={"wave": WaveConfig(retrieval_budget=1.0)},
                       backend="fast", progress=False)
    np.testing.assert_allclose(ppl["full"][1], ppl["plain"][1], atol=2e-3)
    np.testing.assert_allclose(ppl["wave"][1], ppl["plain"][1], atol=2e-3)


@pytest.mark.model
def test_layer_errors_vanish_at_full_budget_and_grow_below_it(captured):
    from retrokv.harness.eval import layer_errors
    from retrokv.wave_index import WaveConfig

    few = {i: captured[i] for i in (3, 12)}
    exact = layer_errors(few, "wave", WaveConfig(retrieval_budget=1.0), backend="fast", n_queries=4)
    # the 1024-token capture is below the default build threshold (dense): index it anyway
    sparse = layer_errors(few, "wave", WaveConfig(min_index_tokens=0), backend="fast", n_queries=4)
    for e, s in zip(exact, sparse):
        assert e["error"] < 1e-4 and e["density"] == pytest.approx(1.0) and e["recall"] == 1.0
        assert s["error"] > e["error"] and s["density"] < 0.3 and 0 < s["recall"] < 1


def test_cli_rejects_bad_arguments(capsys):
    from retrokv.harness.cli import build_parser

    p = build_parser()
    for bad in (["eval", "--methods", "full,hnsw"], ["eval", "--lengths", "4k"], ["eval", "--lengths", "100"],
                ["eval", "--tasks", "qa"], ["eval", "--depths", "0.5,1.5"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    a = p.parse_args(["eval", "--methods", "wave,graph", "--lengths", "4096,8192", "--samples", "2"])
    assert a.methods == ["wave", "graph"] and a.lengths == [4096, 8192] and a.samples == 2 and a.depths is None
    assert p.parse_args(["eval", "--depths", "0.1,0.9"]).depths == [0.1, 0.9]


def test_cli_writes_table_json_and_plots(tmp_path):
    from retrokv.harness.cli import _write

    args = argparse.Namespace(out=str(tmp_path), backend="fast", ppl_tokens=8, lengths=[1024])
    rows = [{"task": "passkey", "length": 1024, "method": m, "samples": 2, "accuracy": a, "density": d,
             "decode_tok_s": 3.0, "build_s": 0.1, "prefill_s": 1.0} for m, a, d in (("full", 1.0, 1.0),
                                                                                   ("wave", 0.5, 0.05))]
    layers = {"wave": [{"layer": i, "error": 0.1 * (i + 1), "density": 0.05, "recall": 0.5} for i in range(3)]}
    _write(args, rows, [{"length": 1024, "method": "wave", "ppl": 9.0, "ppl_delta_%": 1.0}], layers)
    md = (tmp_path / "eval.md").read_text()
    assert "| passkey | 1024 | wave | 2 | 0.500 | 0.050 |" in md and "Perplexity" in md
    assert (tmp_path / "eval_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "eval_layers.png").stat().st_size > 1000


def test_run_task_validates_methods_before_any_work():
    from retrokv.harness import eval as E

    with pytest.raises(ValueError, match="method must be one of"):
        E.run_task(None, None, [], ("full", ("mine", "nope")))
    with pytest.raises(TypeError, match="label, method"):
        E.run_task(None, None, [], (("a", "full", "x"),))
    with pytest.raises(ValueError, match="distinct"):
        E.run_task(None, None, [], ("wave", ("wave", "graph")))
