# lorafold — one command to run, one command to test (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lorafold-installed
PORT    ?= 5000

# llama.cpp for the GGUF tests (tests/engine/test_gguf_llama.py): llama-cpp-python built from its PyPI sdist, CPU
# only, without the parts the tests do not use (research/oracles.md). ~30 min on 2 cores; pip keeps the built wheel
# in its cache, so a second run takes seconds. Not quiet: a 30-minute build shows that it is alive.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: install llama-oracle run demo demo-reset worker test test-fast reliability bench bench-gpu bench-gpu-rehearsal bench-e2e lint clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: 2.13.0 resolves to the local CPU build here; a looser pin pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -c requirements/constraints.txt torch
	$(BIN)/python -m pip install -q -c requirements/constraints.txt -e '.[worker,web,test]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the `lorafold` console script and every extra

llama-oracle: $(STAMP)  ## build and install llama-cpp-python (llama.cpp) for the GGUF tests; not part of `make install`
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(BIN)/python -m pip install -c requirements/constraints.txt llama-cpp-python

run: $(STAMP)  ## the whole service on embedded defaults (SQLite + embedded broker), web and one worker
	PORT=$(PORT) $(BIN)/lorafold serve

demo: $(STAMP)  ## the service plus a local Hub (127.0.0.1:5001, DEMO_HUB_PORT) seeded with a small model and adapter (no internet)
	PORT=$(PORT) $(BIN)/python -m tests.support.demo

demo-reset: $(STAMP)  ## forget the demo's Hub repos and jobs (var/demo): the next `make demo` starts from scratch
	$(BIN)/python -m tests.support.demo --reset

# Bytecode caches on for the tests even where the environment turns them off (PYTHONDONTWRITEBYTECODE=1, common
# in containers): the suite starts ~200 Python processes (workers, job processes, CLI runs), and without caches
# each compiles our modules again and pytest rewrites every test module's asserts again in each xdist worker
# (~35 CPU-s of ~400; __pycache__ is ignored by git).
PYCACHE := PYTHONDONTWRITEBYTECODE=

test: $(STAMP)  ## every test
	$(PYCACHE) $(BIN)/python -m compileall -q worker web hubdouble bench tests >/dev/null
	$(PYCACHE) $(BIN)/python -m pytest -n 4 --dist loadgroup $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYCACHE) $(BIN)/python -m compileall -q worker web hubdouble bench tests >/dev/null
	$(PYCACHE) $(BIN)/python -m pytest -n 4 --dist loadgroup -m "not slow and not browser" $(PYTEST_ARGS)

reliability: $(STAMP)  ## fault, load and hostile-input tests, then the table fault | expected | observed
	$(BIN)/python -m tests.support.reliability_report

bench: $(STAMP)  ## CPU benchmarks (1.1B merge vs raw copy vs PEFT; memory flatness); see bench/README.md
	$(BIN)/python -m bench.merge_bench --size 1b
	$(BIN)/python -m bench.flat_memory

bench-gpu:  ## the GPU proof (bench/gpu_proof.py) with this machine's own python3 and torch; installs nothing
	PYTHONPATH=. $(PY) bench/gpu_proof.py $(GPU_PROOF_ARGS)

bench-gpu-rehearsal: $(STAMP)  ## the same script on CPU: tiny shapes, the async fake device (see bench/README.md)
	$(BIN)/python -m bench.gpu_proof --pack
	PYTHONPATH=. $(BIN)/python bench/gpu_proof.py --size tiny --fake

bench-e2e: $(STAMP)  ## the 1.1B merge end to end (fresh process + sync) against cp -r + sync
	$(BIN)/python -m bench.e2e --size 1b

lint: $(STAMP)
	$(BIN)/ruff check worker web tests bench hubdouble

clean:
	rm -rf $(VENV) var test-output bench/out
