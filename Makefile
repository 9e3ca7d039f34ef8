# `make demo`: set up (venv, packages, openclipart) and train + evaluate MS-CLIP-S tiny.
# `make test`: set up and run the CPU test suite (plus nvcc compiles of csrc/**/*.cu).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NVCC ?= $(shell command -v nvcc || echo /usr/local/cuda/bin/nvcc)
PYTEST_ARGS ?=
EXT_LOG := build/ext_build.log

.PHONY: setup demo test test-fast openclipart nvcc-check cpp-test clean

setup: $(STAMP) openclipart

$(STAMP): requirements.txt setup.py pyproject.toml
	[ -x $(VPY) ] || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip setuptools wheel
	$(VPY) -m pip install --quiet -r requirements.txt
	@# the one slow step: pip -v, reduced to one line per compiled file (full output in EXT_LOG)
	@mkdir -p build
	@echo "== building the C++ extension msclip_fast._C from csrc/ (CPU kernels; CUDA kernels too where nvcc and"
	@echo "   a CUDA torch exist): about 2-3 minutes on 2 cores, longer with CUDA; full log in $(EXT_LOG)"
	@{ $(VPY) -m pip install -v --no-build-isolation -e . 2>&1; echo $$? > $(EXT_LOG).rc; } | tee $(EXT_LOG) | \
	  sed -nuE -e 's#^ *(\[[0-9]+/[0-9]+\]) .* -c ([^ ]*/)?(csrc/[^ ]+\.(cpp|cu)) .*#  \1 compiling \3#p' \
	    -e 's#^ *[^ []*(c\+\+|g\+\+|gcc|nvcc) .* -c ([^ ]*/)?(csrc/[^ ]+\.(cpp|cu)) .*#  compiling \3#p' \
	    -e 's#^ *[^ ]*(c\+\+|g\+\+)( .*)? -shared .*_C\..*#  linking msclip_fast._C#p' \
	    -e '/^msclip_fast\._C:|[Ee]rror|Successfully installed/p'
	@rc=$$(cat $(EXT_LOG).rc); rm -f $(EXT_LOG).rc; [ "$$rc" = 0 ] || { \
	  echo "extension build failed (pip exit $$rc); the end of $(EXT_LOG):"; tail -n 40 $(EXT_LOG); exit "$$rc"; }
	touch $(STAMP)

# The Open Clip Art Library (public domain) from Debian: the demo's real image-text data.
openclipart:
	@[ -d /usr/share/openclipart ] || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq openclipart-png openclipart-svg; }

demo: setup
	bash scripts/demo.sh

# two pytest-xdist workers (one per core; a test file stays on one worker, so its module
# fixtures are built once, but for the long files tests/conftest.py spreads), then the
# timing-sensitive tests alone (marker `serial`)
test: setup nvcc-check cpp-test
	$(VPY) -m pytest -m "not gpu and not serial" -q -n 2 --dist loadgroup --durations=25 $(PYTEST_ARGS)
	$(VPY) -m pytest -m "not gpu and serial" -q --durations=10 $(PYTEST_ARGS)

test-fast: setup
	$(VPY) -m pytest -m "not gpu and not slow" -q $(PYTEST_ARGS)

# nothing CUDA runs here, but every .cu file must compile for Hopper and Ampere. Without nvcc the
# check is skipped with a note (NVCC_REQUIRED=1 makes that an error, for CI that must check).
NVCC_REQUIRED ?= 0
nvcc-check:
	@files=$$(find csrc -name '*.cu' 2>/dev/null); \
	if [ -z "$$files" ]; then echo "nvcc-check: no .cu files"; exit 0; fi; \
	if ! command -v $(NVCC) >/dev/null 2>&1; then \
	  if [ "$(NVCC_REQUIRED)" = 1 ]; then echo "nvcc-check: nvcc not found at $(NVCC) (NVCC_REQUIRED=1)"; exit 1; fi; \
	  echo "nvcc-check: skipped the .cu compile check: nvcc not found (NVCC=$(NVCC); install the CUDA toolkit or set NVCC=/path/to/nvcc)"; \
	  exit 0; fi; \
	for f in $$files; do for a in sm_90 sm_80; do \
	  echo "nvcc -arch=$$a $$f"; \
	  $(NVCC) -std=c++17 -arch=$$a -Icsrc -c $$f -o /dev/null || exit 1; done; done

# torch-free C++ core (csrc/contrastive tile math + CPU driver) and its unit tests, via ctest
CMAKE_BUILD_DIR ?= build/cmake
cpp-test:
	@command -v cmake >/dev/null 2>&1 || { echo "cpp-test: cmake (>= 3.18) not found: apt-get install cmake"; exit 1; }
	@echo "== C++ unit tests (csrc/tests) with cmake in $(CMAKE_BUILD_DIR)"
	cmake -S . -B $(CMAKE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release >/dev/null
	cmake --build $(CMAKE_BUILD_DIR) -j 2
	cd $(CMAKE_BUILD_DIR) && ctest --output-on-failure

clean:
	rm -rf build *.egg-info runs/demo

# Static kernel report (bench/kernel_report.py): every Triton kernel variant the GPU path launches
# at CLIP shapes, compiled for sm_90 with Triton's ptxas; fails when a bf16 kernel spills or a
# tl.dot kernel uses no tensor-core instruction. JSON in build/, cache in build/triton_cache_report.
.PHONY: kernel-report triton36-check
test: kernel-report triton36-check
kernel-report: $(STAMP)
	$(VPY) -m bench.kernel_report --check --quiet --json build/kernel_report.json

# The device machine runs Triton 3.6: compile the kernels with it too (report at CLIP shapes and
# the awkward-shape compile test), from a 3.6 wheel unpacked under build/ that shadows the venv's
# Triton through PYTHONPATH (torch stays the venv's). About 190 MB downloaded once, 640 MB unpacked.
TRITON36 := 3.6.0
TRITON36_DIR := build/triton36
$(TRITON36_DIR)/.installed:
	$(VPY) -m pip download --quiet --no-deps --dest build/wheels triton==$(TRITON36)
	rm -rf $(TRITON36_DIR)
	$(VPY) -m pip install --quiet --no-deps --target $(TRITON36_DIR) build/wheels/triton-$(TRITON36)-*.whl
	touch $@
triton36-check: $(STAMP) $(TRITON36_DIR)/.installed
	PYTHONPATH=$(TRITON36_DIR) TRITON_CACHE_DIR=build/triton_cache_report36 \
	  $(VPY) -m bench.kernel_report --check --quiet --expect-triton 3.6 --json build/kernel_report_triton36.json
	PYTHONPATH=$(TRITON36_DIR) TRITON_CACHE_DIR=build/triton_cache_aot36 $(VPY) tests/ops/_triton_aot.py 90 \
	  > build/triton36_aot.log 2>&1 || { tail -40 build/triton36_aot.log; exit 1; }
	@tail -1 build/triton36_aot.log

# bench/gpu_check.sh --dry-run: every step of the GPU check on the CPU (CPU-only build into
# build/, the gpu tests through the interpreter with the predicted Triton compile count checked
# against bench/gpu_budget.json, the benchmarks at tiny sizes), so the script a lent GPU runs is
# tested here first. Logs, summary.json and summary.md in build/gpu_check_dry_run_out.
.PHONY: gpu-check-dry-run
test: gpu-check-dry-run
gpu-check-dry-run: $(STAMP)
	PYTHON=$(abspath $(VPY)) bash bench/gpu_check.sh --dry-run build/gpu_check_dry_run_out
