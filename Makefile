# `make demo`: set up (venv, packages, openclipart) and train + evaluate MS-CLIP-S tiny.
# `make test`: set up and run the CPU test suite (plus nvcc compiles of csrc/**/*.cu).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NVCC ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast openclipart nvcc-check cpp-test clean

setup: $(STAMP) openclipart

$(STAMP): requirements.txt setup.py pyproject.toml
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip setuptools wheel
	$(VPY) -m pip install --quiet -r requirements.txt
	$(VPY) -m pip install --quiet --no-build-isolation -e .
	touch $(STAMP)

# The Open Clip Art Library (public domain) from Debian: the demo's real image-text data.
openclipart:
	@[ -d /usr/share/openclipart ] || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq openclipart-png openclipart-svg; }

demo: setup
	bash scripts/demo.sh

test: setup nvcc-check cpp-test
	$(VPY) -m pytest -m "not gpu" -q $(PYTEST_ARGS)

test-fast: setup
	$(VPY) -m pytest -m "not gpu and not slow" -q $(PYTEST_ARGS)

# nothing CUDA runs here, but every .cu file must compile for Hopper and Ampere
nvcc-check:
	@files=$$(find csrc -name '*.cu' 2>/dev/null); \
	if [ -z "$$files" ]; then echo "nvcc-check: no .cu files"; exit 0; fi; \
	for f in $$files; do for a in sm_90 sm_80; do \
	  echo "nvcc -arch=$$a $$f"; \
	  $(NVCC) -std=c++17 -arch=$$a -Icsrc -c $$f -o /dev/null || exit 1; done; done

# torch-free C++ core (csrc/contrastive tile math + CPU driver) and its unit tests, via ctest
CMAKE_BUILD_DIR ?= build/cmake
cpp-test:
	cmake -S . -B $(CMAKE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(CMAKE_BUILD_DIR) -j 2
	cd $(CMAKE_BUILD_DIR) && ctest --output-on-failure

clean:
	rm -rf build *.egg-info runs/demo
