# transpose-jax: `make demo` and `make test` are the whole quick start.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED ?= $(abspath ../shared)
# tcmalloc makes both XLA:CPU and the input pipeline 1.4-2x faster here; used when present.
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
RUN := env $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC)) TRANSPOSE_SHARED=$(SHARED) PYTHONUNBUFFERED=1
PYTEST_ARGS ?=
# The suite checks bit-level parity with the official float32 CPU code, so it
# runs on JAX's CPU backend on any host (GPU and TPU hosts too);
# `make test-device` runs the tests that hold on any backend on the host's
# accelerator.
TEST_ENV := env JAX_PLATFORMS=cpu
JPEG_ROI := input_pipeline/_jpeg_roi.so
DARK_LIB := transpose_jax/evaluation/_dark.so
# A checkout of yangsenius/TransPose: `make bench OFFICIAL=DIR` times the
# official training step and data pipeline beside ours (needs yacs);
# `make bench BASELINE=DIR` times another checkout of this project's training
# step instead (e.g. `git worktree add DIR <commit>`); ROUNDS=3 alternates the
# two training steps three times (drift-robust ratio).
OFFICIAL ?=
BASELINE ?=
ROUNDS ?= 1
# The accelerator build of jax, at the version requirements.txt installed:
# `make install ACCEL=cuda12` (or cuda13, tpu). Empty: CPU only.
ACCEL ?=
ACCELS := cuda12 cuda13 tpu
ifneq ($(ACCEL),)
ifeq ($(filter $(ACCEL),$(ACCELS)),)
$(error ACCEL=$(ACCEL): expected one of $(ACCELS), or nothing for CPU)
endif
STAMP := $(VENV)/.installed-$(ACCEL)
endif

.PHONY: install test test-slow test-all test-device demo bench clean

install: $(STAMP) $(JPEG_ROI) $(DARK_LIB)

$(STAMP): requirements.txt requirements-dev.txt requirements-export.txt pyproject.toml
	@if [ -z "$(TCMALLOC)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) || \
	  echo "note: libtcmalloc-minimal4 not installed; running without it (slower)"; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-export.txt
	$(if $(ACCEL),$(PY) -m pip install -q "jax[$(ACCEL)]==$$($(PY) -c 'import jax; print(jax.__version__)')")
	touch $(STAMP)

# JPEG region decoding for the training pipeline (input_pipeline/jpeg_roi.py);
# without gcc + libjpeg headers the pipeline decodes whole images (same crops).
$(JPEG_ROI): input_pipeline/_jpeg_roi.c
	@$${CC:-gcc} -O2 -shared -fPIC $< -o $@ -ljpeg 2>/dev/null || \
	  echo "note: $@ not built (needs gcc and libjpeg-turbo headers: apt-get install libjpeg62-turbo-dev); training decodes whole JPEGs (same crops, slower)"

# DARK decoding's blur in C (transpose_jax/evaluation/dark_native.py; the
# flags keep every rounding as written); without gcc evaluation decodes with
# numpy + cv2 (same results, slower).
$(DARK_LIB): transpose_jax/evaluation/_dark.c
	@($${CC:-gcc} -O3 -fno-fast-math -ffp-contract=off -fno-math-errno -shared -fPIC $< -o $@.tmp -lm 2>/dev/null && mv $@.tmp $@) || \
	  echo "note: $@ not built (needs gcc); evaluation decodes heatmaps with numpy + cv2 (same results, slower)"

# The default suite (< 20 minutes on 2 cores: tests/unit, tests/parity,
# tests/integration); slow tests have their own target.
test: install
	$(RUN) $(TEST_ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-slow: install
	$(RUN) $(TEST_ENV) $(PY) -m pytest -q -m slow $(PYTEST_ARGS) tests

test-device: install
	$(RUN) env -u JAX_PLATFORMS $(PY) -m pytest -q -m "not slow and not cpu_only" $(PYTEST_ARGS) tests

test-all: install
	$(RUN) $(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: install
	$(RUN) $(PY) -m transpose_jax.demo

bench: install
	$(RUN) $(PY) benchmarks/models.py
	$(RUN) $(PY) benchmarks/train_step.py $(if $(OFFICIAL),--official $(OFFICIAL) --rounds $(ROUNDS)) $(if $(BASELINE),--baseline $(BASELINE) --rounds $(ROUNDS))
	$(RUN) $(PY) benchmarks/input_pipeline.py $(if $(OFFICIAL),--official $(OFFICIAL))

# Training and evaluation throughput, peak memory and MFU per variant and
# dtype on this host's accelerator (docs/accelerators.md); OFFICIAL=DIR adds
# the official PyTorch step on the same GPU. Writes accelerator.json.
.PHONY: bench-accelerator
bench-accelerator: install
	$(RUN) $(PY) benchmarks/accelerator.py $(if $(OFFICIAL),--official $(OFFICIAL))

clean:
	rm -rf $(VENV) .pytest_cache
