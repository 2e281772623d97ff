# lorafold — one command to run, one command to test (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lorafold-installed
PORT    ?= 5000

.PHONY: install run demo demo-reset worker test test-fast reliability bench bench-gpu lint clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 resolves to the local CPU build here; a looser pin pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c requirements/constraints.txt torch
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[worker,web,test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the `lorafold` console script and every extra

run: $(STAMP)  ## the whole service on embedded defaults (SQLite + embedded broker), web and one worker
	PORT=$(PORT) $(BIN)/lorafold serve

demo: $(STAMP)  ## the service plus a local Hub (127.0.0.1:5001, DEMO_HUB_PORT) seeded with a small model and adapter (no internet)
	PORT=$(PORT) $(BIN)/python -m tests.support.demo

demo-reset: $(STAMP)  ## forget the demo's Hub repos and jobs (var/demo): the next `make demo` starts from scratch
	$(BIN)/python -m tests.support.demo --reset

test: $(STAMP)  ## every test
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow and not browser" $(PYTEST_ARGS)

reliability: $(STAMP)  ## fault, load and hostile-input tests, then the table fault | expected | observed
	$(BIN)/python -m tests.support.reliability_report

bench: $(STAMP)  ## CPU benchmarks (1.1B merge vs raw copy vs PEFT; memory flatness); see bench/README.md
	$(BIN)/python -m bench.merge_bench --size 1b
	$(BIN)/python -m bench.flat_memory

bench-gpu: $(STAMP)  ## the GPU benchmark (8B + 70B-shaped layers, --device cuda); needs a CUDA machine
	$(BIN)/python -m bench.merge_bench --size 8b --size 70b-layers --device cuda

lint: $(STAMP)
	$(BIN)/ruff check worker web tests bench

clean:
	rm -rf $(VENV) var test-output bench/out
