"""The ``retrokv`` command refuses bad arguments before the model loads, in one line (exit 2)."""
from __future__ import annotations

import pytest

from retrokv.harness import cli


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: every refusal below must come before it."""
    import retrokv.harness.models as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(models, "load_smollm2", boom)


@pytest.mark.parametrize("argv, says", [
    (["eval", "--out", "/dev/null/x"], "--out '/dev/null/x' is not a writable folder"),
    (["eval", "--lengths", "100000"], "--lengths 100000 exceeds SmolLM2's 8192-token context"),
    (["eval", "--ppl", "--ppl-tokens", "-5"], "--ppl-tokens must be >= 1, got -5"),
    (["eval", "--ppl", "--ppl-tokens", "0"], "--ppl-tokens must be >= 1, got 0"),
    (["eval", "--samples", "0"], "--samples must be >= 1"),
    (["demo", "--samples", "0"], "--samples must be >= 1"),
    (["demo", "--ppl-tokens", "-1"], "--ppl-tokens must be >= 0"),
    (["demo", "--lengths", "9000"], "--lengths 9000 exceeds"),
    (["sparsity", "--tokens", "10"], "--tokens must be in [256, 8192]"),
    (["sparsity", "--decode", "3000"], "--decode must be >= 1 and less than half"),
])
def test_bad_arguments_are_one_line_before_the_model_loads(argv, says, no_model, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_argparse_errors_are_short(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--methods", "flash"])
    assert e.value.code == 2
    assert "unknown methods ['flash']" in capsys.readouterr().err


def test_warmup_runs_each_named_method_once_and_refuses_unknown_names(capsys, no_model):
    """``retrokv warmup`` (what ``make setup`` runs): builds, decodes and appends with each method named,
    without the model, and reports one time per method; an unknown name is a short parser error."""
    from retrokv.harness import warmup

    assert cli.main(["warmup", "--methods", "streaming,quest"]) == 0
    out = capsys.readouterr().out
    assert "streaming" in out and "quest" in out and "wave" not in out
    assert set(warmup.warmup(["streaming"], progress=False)) == {"streaming"}
    with pytest.raises(ValueError, match="unknown methods"):
        warmup.warmup(["flash"], progress=False)
    with pytest.raises(SystemExit) as e:
        cli.main(["warmup", "--methods", "flash"])
    assert e.value.code == 2
