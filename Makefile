# pqsweep: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SWEEP ?= mnist_cnn_sparsity_x_precision
STAMP := $(VENV)/.installed
# where `make results` keeps its MLflow store, Optuna journal and cache (./mlflow.db by default)
RUN_DIR ?= .
# what `make results` adds to pqsweep-report, e.g. REPORT_ARGS='--compare train.distill.enabled' for a seeded study
REPORT_ARGS ?=
# Every script in benchmarks/ is a benchmark but its helpers (plain_grid.py: framework.py's reference side;
# timed_sweep.py: how the sweep benchmarks run a sweep and read it back). `make bench` runs each with its defaults or
# BENCH_ARGS_<name>, sized so that all of them take under 20 min on the shared 2-core machine, at one torch thread:
# there a second thread waits on other jobs, and the same command's time varied up to 6x from run to run.
BENCH_HELPERS := plain_grid timed_sweep
BENCHMARKS := $(filter-out $(BENCH_HELPERS),$(basename $(notdir $(wildcard benchmarks/*.py))))
BENCH_ARGS_startup := --repeats 3
BENCH_ARGS_methods := --csv results/methods_cnn_mnist5k.csv
# speed.py's full rounds alone took 14 min here; --quick, 6 min
BENCH_ARGS_speed := --quick
# search_vs_grid.py's full 96-point grid and 3 x 2 searches took 6-9 min here; --quick (32 points, 10 trials), ~2.5
BENCH_ARGS_search_vs_grid := --quick
# early_stop.py's 3 seeds x 2 studies of 24 trials took ~40 min here; one seed of 12 trials at 4 epochs, ~5 min, beside
# (not over) the committed results/early_stop.csv
BENCH_ARGS_early_stop := --seeds 0 --trials 12 --epochs 4 --csv results/early_stop_quick.csv
# runtimes.py's 17 points in 4 runtimes took 7 min here at a load average of 9-12; --quick: 11 points, 1 epoch, 20 repeats
BENCH_ARGS_runtimes := --quick

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pqsweep with its test extras (quick when nothing changed)

run: install ## run the default sweep on embedded MNIST digits (no download) and print its table
	$(BIN)/pqsweep -m sweep=$(SWEEP)
	$(BIN)/pqsweep-report $(SWEEP)

test: install ## run the whole test suite, the slow tier included (what CI runs)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install ## the quick tier: every test but the slow ones (end-to-end runs, products over every option)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

sweep: install ## run one study from sweeps/: make sweep SWEEP=<name>
	$(BIN)/pqsweep -m sweep=$(SWEEP)

report: install ## print a sweep's table from MLflow: make report SWEEP=<name>
	$(BIN)/pqsweep-report $(SWEEP)

results: install ## a paper's sweep at cpu scale, its report kept in results/<SWEEP>/ with the command, date and machine
	mkdir -p $(RUN_DIR) && cd $(RUN_DIR) && $(CURDIR)/$(BIN)/pqsweep -m sweep=$(SWEEP) $(SWEEP_ARGS)
	set -o pipefail; rm -rf results/$(SWEEP) && cd $(RUN_DIR) && $(CURDIR)/$(BIN)/pqsweep-report $(SWEEP) --no-plots --out $(CURDIR)/results/$(SWEEP) $(REPORT_ARGS) | tee $(CURDIR)/results/$(SWEEP).txt
	mv results/$(SWEEP).txt results/$(SWEEP)/report.txt
	@{ echo "# $(SWEEP) at cpu scale"; echo; \
	  echo "- command: \`make results SWEEP=$(SWEEP)$(if $(SWEEP_ARGS), SWEEP_ARGS='$(SWEEP_ARGS)')$(if $(REPORT_ARGS), REPORT_ARGS='$(REPORT_ARGS)')\` (\`pqsweep -m sweep=$(SWEEP) $(SWEEP_ARGS)\`, then \`pqsweep-report $(SWEEP) $(REPORT_ARGS)\`; its output: report.txt)"; \
	  echo "- date: $$(date -u '+%Y-%m-%d %H:%M UTC'), commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; \
	  echo "- machine: $$(nproc --all) cores ($$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $$(free -g | awk '/Mem:/ {print $$2}') GiB, no GPU used; $$($(BIN)/python -c 'import platform, torch; print(f"Python {platform.python_version()}, torch {torch.__version__}")')"; \
	  echo "- sweep: sweeps/$(SWEEP).yaml$(if $(wildcard sweeps/$(SWEEP).paper.csv),; paper values: sweeps/$(SWEEP).paper.csv)"; } > results/$(SWEEP)/README.md
	@cat results/$(SWEEP)/README.md

bench: install $(addprefix bench-,$(BENCHMARKS)) ## run every benchmark in turn (19 min here), CSVs in results/; make bench-<name>: one

bench-%: install
	@echo "== benchmarks/$*.py $(BENCH_ARGS_$*)"
	@start=$$(date +%s); OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/$*.py $(BENCH_ARGS_$*); \
	echo "== benchmarks/$*.py: $$(( $$(date +%s) - start )) s"

ui: install ## the MLflow UI for ./mlflow.db on http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean: ## remove run outputs, the baseline cache and the local MLflow store (keeps .venv)
	rm -rf outputs multirun .pqsweep_cache mlflow.db mlartifacts .pytest_cache

.PHONY: help install run test test-fast sweep report results bench ui clean
.NOTPARALLEL: bench  # benchmarks side by side would time each other
