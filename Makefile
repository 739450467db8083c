# LLMOS: `make run` installs and writes with the bundled default model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install run test bench clean

$(BIN)/llmos: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	$(BIN)/python -m llmos.kernels   # compile the quantized kernels for this CPU, once
	touch $@

install: $(BIN)/llmos

run: install
	$(BIN)/llmos write poem "the sea at night"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) .test-home .pytest_cache
