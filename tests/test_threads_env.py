"""retrokv sets libgomp's wait policy before torch loads it (retrokv/__init__.py), keeps a value the
user set, and warns once from ``hf.attach`` when torch was imported first (too late to set it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(code, **env):
    e = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_sets_passive_and_keeps_the_users_policy():
    code = "import os, retrokv; print(os.environ['OMP_WAIT_POLICY'], retrokv._TORCH_LOADED_FIRST)"
    assert run(code) == "passive False"
    assert run(code, OMP_WAIT_POLICY="active") == "active False"


def test_attach_warns_once_when_torch_came_first():
    pytest.importorskip("torch")
    code = ("import warnings, torch, retrokv\n"
            "from retrokv import hf\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    hf._warn_if_torch_first('fast'); hf._warn_if_torch_first('fast')\n"
            "print(retrokv._TORCH_LOADED_FIRST, len(w), 'OMP_WAIT_POLICY=passive' in str(w[0].message))")
    assert run(code) == "True 1 True"
    quiet = code.replace("import warnings, torch, retrokv", "import warnings, retrokv, torch").replace(
        "print(retrokv._TORCH_LOADED_FIRST, len(w), 'OMP_WAIT_POLICY=passive' in str(w[0].message))",
        "print(retrokv._TORCH_LOADED_FIRST, len(w))")
    assert run(quiet) == "False 0"
