# tunequeue: `make demo` runs the whole loop offline, `make test` runs the test suite (both install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without CUDA, torch is installed first as the pinned CPU build, so that pip never pulls the CUDA
# packages. Set TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) where that wheel is not in pip's reach.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: install demo test worker clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/python manage.py db upgrade
	$(BIN)/python manage.py demo

test: install
	$(BIN)/python -m pytest -q

worker: install
	$(BIN)/python manage.py worker

clean:
	rm -rf $(VENV) .tunequeue .pytest_cache
