# Two commands do all setup on a fresh machine:
#   make demo   - creates .venv if missing, then runs the bundled demo pipeline
#   make test   - creates .venv if missing, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/.featstack-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.featstack-installed

demo: venv
	$(BIN)/featstack run pipelines/demo.yaml

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) cache/*.h5 cache/*.shards runs models nets
