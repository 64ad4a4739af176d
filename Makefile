# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
#
# torch is pinned to the CPU build for CI and the demo. GPU users: install your
# own CUDA torch into .venv first and run `make install TORCH_SPEC=` (empty)
# so the pin is skipped; pip then keeps your torch.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install browser lint format test demo bench docs api clean

# torch-fidelity's Inception-v3 FID extractor (the package's `fid` extra): --no-deps
# because the package declares torchvision (for extractors we don't use), and PyPI's
# torchvision does not import beside the pinned CPU torch. pipelines/evaluate/features.py loads
# the Inception module without torchvision.
# (Comments stay out of recipes: make echoes every recipe line, comments included.)
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "torch-fidelity==0.4.0"
	touch $@

install: $(VENV)/.installed

# ruff (lint rules and formatter in pyproject.toml) and import-linter (the house's import contracts).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Debian's chromium for the browser test of `cdm ui` (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Two pytest processes: the Ray-using modules in one (one Ray at a time), the rest beside them (tests/conftest.py).
PYTEST_PROCESSES ?= -n 2 --dist loadgroup

test: lint browser
	CDM_REQUIRE_BROWSER=1 $(PY) -m pytest $(PYTEST_PROCESSES) $(PYTEST_ARGS)

# The whole pipeline on mnist5k with a local Ray and ./mlflow.db; rerunning skips finished stages.
demo: install
	$(VENV)/bin/cdm run configs/demo.toml

# The documentation site: the generated pages rewritten from the code and the results files
# (docs/generate.py), then `mkdocs build --strict` into site/ (a broken link or a missing page fails).
# The docs extra is installed once, like the test extra, and recorded beside .installed.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(PY) docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The API reference of cdm_core and pipelines, from their docstrings (pdoc), in docs/api/ (not part of the site).
api: $(VENV)/.docs-installed
	$(PY) -m pdoc --output-directory docs/api cdm_core pipelines

bench: install
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) outputs mlflow.db .pytest_cache site
