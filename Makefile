# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# `make package` builds the wheel and the sdist and runs the README's quickstart against the wheel (.ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on the development machines' disk; on a GPU machine
# install your own torch into .venv first and this pin is skipped (see README).
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test package clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_PIN)"
	$(PY) -m pip install -e ".[test]"
	# LitGPT without its pins (huggingface-hub < 1.4, jsonargparse <= 4.41), which would pull transformers
	# down and cannot be resolved beside ai2-olmo-core: its CLI runs on the versions above (tests/test_litgpt.py).
	$(PY) -m pip install --no-deps "litgpt==0.5.13"
	# torchtitan without its pins (wandb, torch_checkpointing): the model side imports only torchtitan, tyro and
	# spmd_types, and triton (left alone where a GPU torch brought one); its Trainer (tests/test_titan.py) also
	# imports torchdata and datasets (5.2 accepts the huggingface-hub < 2 that ai2-olmo-core's pins leave).
	$(PY) -m pip install --no-deps "torchtitan==0.3.0"
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install triton
	$(PY) -m pip install tyro "spmd_types==0.2.3" "torchdata==0.11.0" "datasets==5.2.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m seedprints_lightning.train.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

package: setup
	bash .ci/run package

clean:
	rm -rf runs .pytest_cache build dist *.egg-info
