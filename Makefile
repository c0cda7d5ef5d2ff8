# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on the development machines' disk; on a GPU machine
# install your own torch into .venv first and this pin is skipped (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m seedprints_lightning.train.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache build *.egg-info
