# Everything a user needs: `make demo` and `make test` install into .venv first (quick when up to date).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The demo: the poster's focal_g02 arm on the embedded synthetic data, sized for a 2-core CPU (see conf/preset/demo.yaml).
DEMO_ARGS ?= +experiment=focal_g02 +preset=demo scheduler=cosine

.DEFAULT_GOAL := help
.PHONY: help install demo demo-cells test test-fast test-faults test-e2e test-s3 test-cells-demo test-slurm mutation lint format bench gpu-check gpu-bundle reproduce clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the package with dev tools (idempotent)

demo: $(STAMP)  ## train + test focal_g02 on the synthetic data on CPU, print the run folder and test metrics
	HF_HUB_OFFLINE=1 $(PY) -m hpa_lightning.train $(DEMO_ARGS)

demo-cells: $(STAMP)  ## HPA 2021 single cells on synthetic cells with truth: segment, train, predict per cell, cell mAP (CPU, < 5 min)
	HF_HUB_OFFLINE=1 $(PY) -m hpa_lightning.demo_cells

# The suite runs on one pytest-xdist worker per core (at most 4), a test module at a time on one worker, so the
# trainings and sweeps a module's tests share (module-scoped fixtures) are built once; tests/conftest.py orders them.
# TEST_WORKERS="-p no:xdist" runs it in one process.
TEST_WORKERS ?= -n logical --maxprocesses=4 --dist loadscope --no-loadscope-reorder

# The suite beside its CI-only parts (marked; each has its target below): the fault matrix, the whole-pipeline
# rehearsals, the object-store tests, the single-cell demo and the real SLURM cluster.
NOT_IN_TEST := not slurm and not faults and not e2e and not cells_demo and not s3

test: $(STAMP)  ## run the test suite (CI also runs test-faults, test-e2e, test-s3, test-cells-demo and test-slurm)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q --durations=15 -m "$(NOT_IN_TEST)" $(TEST_WORKERS) tests

test-fast: $(STAMP)  ## tests without the end-to-end trainings
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m "not slow and $(NOT_IN_TEST)" $(TEST_WORKERS) tests

# Every cell of the fault-injection matrix (a signal at each point of a run, TERM and KILL, DDP included, then resume):
# about 30 trainings, so beside `make test`. CI runs both.
# Its cells are runs of their own, dealt one by one to the workers (one module: loadscope would put them all on one);
# the reference runs they are compared with are built once for all workers (tests/conftest.py built_once).
test-faults: $(STAMP)  ## the fault-injection matrix: preempted or killed at every point, resumed to the same run
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m faults $(subst --dist loadscope,--dist load,$(TEST_WORKERS)) \
		tests/training/test_faults.py

# `make reproduce` at the tests' scale and the GPU check's rehearsal on the CPU: a whole pipeline each, about a minute
# of two cores each, so beside `make test`. CI runs them.
test-e2e: $(STAMP)  ## make reproduce and the gpu-check rehearsal end to end, at the tests' scale
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m e2e $(TEST_WORKERS) tests/reporting/test_reproduce.py tests/bench/test_gpu_check.py

# The streaming store end to end against a loopback S3 server (moto, started by the tests): the memmap store's metrics
# from the object store, two DDP ranks with disjoint shares, SIGTERM mid-epoch and resume (about 5 minutes). CI runs it.
test-s3: $(STAMP)  ## streaming store from a loopback S3 server: same metrics, DDP shares, mid-epoch resume
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m s3 $(TEST_WORKERS) tests/data/test_stream_store.py tests/training/test_stream_training.py \
		tests/bench/test_bench.py

# `make demo-cells` as a test: the best cell score beats copying the image labels to every cell by >= 0.15 cell mAP
# (the issue's bar; about 4 minutes on 2 cores, so beside `make test`). CI runs it.
test-cells-demo: $(STAMP)  ## the single-cell demo end to end, its cell mAP margin over the image-label baseline checked
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m cells_demo tests/cells/test_demo_cells.py

# A one-node SLURM cluster (Debian packages, as root) for the launcher tests; stopped again whatever the outcome.
# Where it cannot be installed or started, the tests skip and say why.
test-slurm: $(STAMP)  ## start a local SLURM cluster, run tests/slurm against it, stop it
	@bash tests/slurm/cluster.sh up || echo "test-slurm: no SLURM cluster could be started; the SLURM tests will skip"
	@HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -m slurm -rs tests/slurm; rc=$$?; \
		bash tests/slurm/cluster.sh stop; exit $$rc

# Mutation testing (mutmut, the `mutation` extra): not part of `make test` or CI, it takes minutes per module.
# MUTATE names the modules (default: metrics, losses, split, targets); tests/mutation.py says how it works.
MUTATE ?=
MUTATION_WORKERS ?= 2
MUTATION_STAMP := $(VENV)/.mutation-stamp

$(MUTATION_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,mutation]'
	touch $(MUTATION_STAMP)

mutation: $(MUTATION_STAMP)  ## mutation testing of the modules that compute metrics and losses and guard files (slow)
	OMP_NUM_THREADS=1 $(PY) -m tests.mutation --workers $(MUTATION_WORKERS) $(MUTATE)

bench: $(STAMP)  ## speed benchmark (ratios first): loading, packing, Lightning overhead, augmentation, GPU, thresholds; BENCH_ARGS=quick=true
	$(PY) -m hpa_lightning.bench $(BENCH_ARGS)

reproduce: $(STAMP)  ## the poster's comparison on the synthetic data (10 arms, baselines, LR finder) -> docs/results/synthetic
	HF_HUB_OFFLINE=1 $(PY) -m hpa_lightning.reproduce $(REPRODUCE_ARGS)

# On a CUDA machine of your own (with .venv). A lent machine reaches no registry: there run the command that
# `make gpu-bundle` prints, which installs the bundle's wheels and runs the check with the image's python3.
gpu-check: $(STAMP)  ## on a CUDA machine: GPU benchmark, a 512 px epoch, predict tta=8, a gpu_pool sweep, compile (7 min)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m hpa_lightning.gpu_check $(GPU_CHECK_ARGS)

gpu-bundle: $(STAMP)  ## rehearse gpu-check on the CPU; wheels it needs beyond the lent GPU image -> .gpu_bundle/; the command
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m hpa_lightning.gpu_bundle $(GPU_BUNDLE_ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .

format: $(STAMP)  ## ruff fix + format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun .cache .pytest_cache .ruff_cache wandb
