# Every target does its own set-up: a virtual environment in .venv with dino-fast installed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; an open range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# FFCV is installed when its system libraries are present (.ci/run installs them as root).
HAVE_FFCV_LIBS := $(shell pkg-config --exists opencv4 libturbojpeg 2>/dev/null && echo 1)
comma := ,
EXTRAS := dev$(if $(HAVE_FFCV_LIBS),$(comma)ffcv)

.PHONY: venv train test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(BIN)/.installed

# The main job on the built-in default: CPU, built-in dataset, minutes.
train: venv
	$(BIN)/dino-fast train --config configs/default.yaml

# The whole test suite (slow tests included), Triton kernels under TRITON_INTERPRET=1.
test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: venv
	$(BIN)/dino-fast bench all --quick

clean:
	rm -rf $(VENV) build *.egg-info
