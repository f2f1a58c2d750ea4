# The two commands of the README: `make demo` and `make test`. Each builds .venv from scratch
# if needed. The CPU torch pin below is for this project's own machines (dev and CI); users with
# GPUs install the package with their own torch build (pyproject states the supported range).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS = 1

.PHONY: setup demo test test-portable lint bench clean

# One line per step, and pip's own progress (no -q): the first build takes minutes and must not
# look stuck. The times are those of a 2-core AMD EPYC with the wheels already cached.
$(VENV)/.installed: pyproject.toml Makefile
	@echo "[setup 1/3] creating $(VENV) with $(PYTHON) (first run only; 1-2 min in all)"
	$(PYTHON) -m venv $(VENV)
	@echo "[setup 2/3] installing $(TORCH_PIN) (CPU build; the largest download)"
	$(PY) -m pip install --progress-bar on $(TORCH_PIN)
	@echo "[setup 3/3] installing deltaH and its dependencies (transformers, peft, trl, pytest, ...)"
	$(PY) -m pip install --progress-bar on -e '.[dev,plots]'
	touch $@
	@echo "[setup] done: $(VENV) is ready"

setup: $(VENV)/.installed

# The toy's matrices are tiny: threads gain nothing, and on a busy 2-core machine torch's default two
# threads wait on each other (the same demo took 161 s with 2 threads, 23 s with 1, side by side;
# on a quiet machine 15.2 s with 2 threads, 16.0 s with 1).
DEMO_THREADS ?= 1

demo: setup
	@echo "[demo] deltah run configs/toy.yaml with $(DEMO_THREADS) thread(s): about 20-30 s on a 2-core CPU"
	OMP_NUM_THREADS=$(DEMO_THREADS) $(VENV)/bin/deltah run configs/toy.yaml

lint: setup
	$(VENV)/bin/ruff check deltaH tests benchmarks examples
	$(VENV)/bin/mypy deltaH

test: lint
	$(PY) -m pytest -q

# The numerically sensitive tests once more on ATen's portable kernels (no SIMD intrinsics). CPUs
# differ (this project runs on AVX-512 and AVX2-only machines) and float32 results round
# differently per kernel set; these tests must hold on every one, not only on the CI's own.
# Any other set: `make test-portable PORTABLE_CAP=avx2` (x86 only).
PORTABLE_TESTS ?= tests/core/test_policy.py tests/core/test_stats.py tests/estimators/test_true.py \
                  tests/updates/test_grads.py tests/estimators/test_kernel.py tests/updates/test_replay.py \
                  tests/estimators/test_token_influence.py tests/integrations/test_replay_trl.py \
                  tests/core/test_shared_prompts.py tests/estimators/test_precision_floor.py
PORTABLE_CAP ?= default

test-portable: setup
	ATEN_CPU_CAPABILITY=$(PORTABLE_CAP) $(PY) -m pytest -q $(PORTABLE_TESTS)

bench: setup
	$(PY) -m benchmarks.run_all --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
