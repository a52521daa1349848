"""Shared fixtures: hypothesis profile, one loaded SmolLM2 per session, captured Q/K/V of a short prompt."""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CAPTURE_TOKENS = 1024   # prompt length for the shared capture: long enough for sparsity, short for CI


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct, loaded once per test session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from retrokv.harness.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def captured(smollm2):
    """``{layer: LayerQKV}`` for every layer of SmolLM2 on CAPTURE_TOKENS tokens of built-in natural text."""
    from retrokv.harness.data import natural_text_ids
    from retrokv.harness.models import capture_qkv

    model, tok = smollm2
    return capture_qkv(model, natural_text_ids(tok, CAPTURE_TOKENS))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
