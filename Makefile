# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The virtual environment is built from requirements.lock (every package pinned) whenever it is missing or the
# lock changed, by uv (the lock's own pin) with pip's index settings (infra/uv_args.py): 70-73 s in all on a fresh
# 2-core machine with an empty cache, where pip took 300-400 s; pip if uv fails. unsafe-best-match is pip's rule (the
# pinned version from whichever index has it; uv's default stops at the first index that knows the name, and this
# machine's registries split versions across indexes). Nothing is downloaded at run time.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export YOLO_OFFLINE := true
export PYTHONUNBUFFERED := 1

.PHONY: repro sweep distill-study label-ceiling label-losses run test test-fast bench lint format doctor lock clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	{ $(PY) -m pip install --quiet --no-deps $$(grep -E '^uv==' requirements.lock) && \
	  $(VENV)/bin/uv pip install --quiet --python $(PY) --no-deps --index-strategy unsafe-best-match \
	    $$($(PY) infra/uv_args.py) -r requirements.lock; } \
	  || { echo "uv could not install the lock: pip instead (slower)"; \
	       $(PY) -m pip install --quiet --no-compile --no-deps -r requirements.lock; }
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)  ## create the virtual environment from the lock

run: $(STAMP)  ## run the whole pipeline on the embedded defaults (sample world, local stores)
	$(VENV)/bin/wanwu run

# pytest-xdist processes (0: this one); a test file stays on one worker (module fixtures, the DVC chain's order).
# --no-loadscope-reorder: xdist 3.8 hands out files with the most tests first by default, which put the two-test DVC
# chain (~5 min) last, with the other worker idle for ~4 min of it; the files go in tests/conftest.py's order instead
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)  ## the whole test suite (what CI runs), on TEST_WORKERS processes
	$(PYTEST)

test-fast: $(STAMP)  ## the suite without the slow (training / export) tests
	$(PYTEST) -m "not slow"

bench: $(STAMP)  ## every benchmark, each against a baseline measured in the same run → bench/results/
	$(PY) -m bench

faults: $(STAMP)  ## the fault suite with more kills (WANWU_FAULTS per stage, default 5) → bench/results/faults.json
	WANWU_FAULTS=$${WANWU_FAULTS:-5} $(PY) -m pytest -m faults -q -s

distill-study: $(STAMP)  ## baseline vs distilled student on the gold set, 3 seeds (after make run) → bench/results/
	$(PY) -m bench.study_distill

label-ceiling: $(STAMP)  ## the train stage with the sample world's perfect labels vs ours (after make run; PROFILE=params/cpu60.yaml)
	$(PY) -m bench.study_label_ceiling $(if $(PROFILE),--profile $(PROFILE))

label-losses: $(STAMP)  ## where the auto labels lose the sample world's objects (after a run; DATA=path/to/data) → bench/results/
	$(PY) -m bench.study_label_losses $(if $(DATA),--data $(DATA))

lint: $(STAMP)  ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

doctor: $(STAMP)  ## what is ready and what is not, with the fix for each
	$(VENV)/bin/wanwu doctor

lock:  ## re-resolve requirements.in into requirements.lock (needs the registries)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -r requirements.in
	.venv-lock/bin/pip freeze --all --exclude-editable | grep -v -E '^(pip|wanwu)==' > requirements.lock  # --all: setuptools builds the editable install
	rm -rf .venv-lock

clean:  ## remove run outputs (keeps the virtual environment)
	rm -rf data/raw data/collect data/world data/autolabel data/quality data/train data/distill data/evaluate \
	       data/export data/promote mlflow.db mlartifacts runs reports .wanwu

repro: $(STAMP)  ## the same pipeline through DVC (dvc repro, via `wanwu repro`: heals a killed dvc's lock file)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/wanwu repro

# A sweep through DVC's experiment queue, up to evaluate (promotion is a decision, not a sweep axis). Needs the
# baseline committed (`make repro`, then `git add dvc.lock data/.gitignore && git commit`): queued experiments
# start from HEAD. Every experiment logs to this project's MLflow store. Pick one: `dvc exp apply <name>`.
GRID ?= -S 'train.lr0=0.001,0.002' -S 'train.imgsz=192,256'
RANK := data/evaluate/metrics.json:best_mAP50-95
sweep: $(STAMP)  ## queue a grid (GRID="-S 'train.lr0=0.001,0.002' ...") with dvc exp, run it, rank by gold mAP50-95
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/wanwu dvc exp run --queue $(GRID) evaluate
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MLFLOW_TRACKING_URI="sqlite:///$(CURDIR)/mlflow.db" \
	  $(VENV)/bin/wanwu dvc exp run --run-all --jobs 1
	$(VENV)/bin/dvc exp show --no-pager --sort-by $(RANK) --sort-order desc --only-changed
