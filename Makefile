# Every target does its own set-up: a virtual environment in .venv with dino-fast installed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; an open range would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The exact versions CI was last green with (see the file's header). PIP_CONSTRAINT, not -c, so
# that build-isolation environments (FFCV builds from an sdist) obey it too.
CONSTRAINTS ?= constraints/ci.txt
# FFCV is installed when its system libraries are present (.ci/run installs them as root).
HAVE_FFCV_LIBS := $(shell pkg-config --exists opencv4 libturbojpeg 2>/dev/null && echo 1)
comma := ,
EXTRAS := dev$(if $(HAVE_FFCV_LIBS),$(comma)ffcv)
# The stamp names what it installed: when the FFCV libraries appear after a first install
# (make train, then apt-get, then make test), the stamp for "dev,ffcv" is missing and the
# install step runs again instead of trusting a stamp written without FFCV.
STAMP := $(BIN)/.installed-$(subst $(comma),-,$(EXTRAS))

# `make test-oldest`: the pinned versions but the oldest Triton the project supports
# (pyproject.toml's lower bound), in its own venv.
TRITON_OLDEST ?= 3.7.0
OLDEST_VENV ?= .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin

# `make test-latest`: the newest release of every dependency but torch (TORCH_SPEC), its own venv.
LATEST_VENV ?= .venv-latest
LATEST_BIN := $(LATEST_VENV)/bin

.PHONY: venv train train-dinov2 test test-fast test-oldest test-latest lint bench learning constraints clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	rm -f $(BIN)/.installed $(BIN)/.installed-*
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/pip install -q --upgrade pip setuptools wheel
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/pip install -q "$(TORCH_SPEC)"
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

# The main job on the built-in default: CPU, built-in dataset, minutes.
train: venv
	$(BIN)/dino-fast train --config configs/default.yaml

# The DINOv2 demo on the built-in data (DINO + iBOT masked-patch loss + KoLeo), then the k-NN.
train-dinov2: venv
	$(BIN)/dino-fast train --config configs/dinov2_demo.yaml

# The whole test suite (slow tests included), Triton kernels under TRITON_INTERPRET=1. The
# header names the versions of torch, triton, numpy and FFCV the run used.
test: venv
	$(BIN)/python -m pytest tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

# The other end of the supported Triton range (.ci/run runs it after `make test`).
test-oldest:
	test -x $(OLDEST_BIN)/python || $(PY) -m venv $(OLDEST_VENV)
	sed 's/^triton==.*/triton==$(TRITON_OLDEST)/' $(CONSTRAINTS) > $(OLDEST_VENV)/constraints.txt
	PIP_CONSTRAINT=$(abspath $(OLDEST_VENV))/constraints.txt $(OLDEST_BIN)/pip install -q --upgrade pip setuptools wheel
	PIP_CONSTRAINT=$(abspath $(OLDEST_VENV))/constraints.txt $(OLDEST_BIN)/pip install -q "$(TORCH_SPEC)"
	PIP_CONSTRAINT=$(abspath $(OLDEST_VENV))/constraints.txt $(OLDEST_BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(OLDEST_BIN)/python -c "import triton; assert triton.__version__ == '$(TRITON_OLDEST)', triton.__version__"
	$(OLDEST_BIN)/python -m pytest tests

# Drift on purpose: the same suite against the newest releases of everything but torch, which
# stays TORCH_SPEC (a constraint: the eager upgrade would otherwise pull the newest CUDA build,
# GBs); set TORCH_SPEC to try another torch.
test-latest:
	test -x $(LATEST_BIN)/python || $(PY) -m venv $(LATEST_VENV)
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_BIN)/pip install -q --upgrade pip setuptools wheel
	PIP_CONSTRAINT=$(abspath $(LATEST_VENV))/torch-constraint.txt $(LATEST_BIN)/pip install -q "$(TORCH_SPEC)"
	PIP_CONSTRAINT=$(abspath $(LATEST_VENV))/torch-constraint.txt $(LATEST_BIN)/pip install -q --upgrade \
		--upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(LATEST_BIN)/python -m pytest tests

# Rewrite the constraints from the test-latest venv (after `make test-latest` passed).
constraints:
	test -x $(LATEST_BIN)/python || { echo "run make test-latest first"; exit 2; }
	{ sed -n '/^#/p' $(CONSTRAINTS); $(LATEST_BIN)/pip freeze --all --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

bench: venv
	$(BIN)/dino-fast bench all --quick

# Does the default recipe learn on image sets nobody tuned it on (bench/learning.py; ~1 h on 2 cores).
learning: venv
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/pip install -q -e ".[$(EXTRAS),bench]"
	$(BIN)/python -m bench.learning

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(LATEST_VENV) build *.egg-info

# Lint (ruff, pinned in constraints/ci.txt); .ci/run runs it before the tests.
lint: venv
	$(BIN)/ruff check dino_fast bench tests
