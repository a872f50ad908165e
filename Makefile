# Two commands set everything up on a fresh machine: `make run` and `make test`.
# Both create (or refresh) the project's own virtual environment in .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,kernels
PROTO_SRC := proto/q8kv/v1/kvcache.proto

.PHONY: venv run test lint proto wheel bench demo accuracy clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

## Start the server (numpy backend where no GPU is found). Flags: make run ARGS="--port 50052"
run: venv
	$(BIN)/q8kv-server $(ARGS)

## ruff + the whole test suite (GPU tests skip themselves without CUDA).
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Regenerate the checked-in stubs from proto/ (tests fail when they are stale).
proto: venv
	$(BIN)/python -m q8kv.server.protogen proto

## A wheel of this checkout in .whl/, for the GPU machine (scripts/device_env.sh installs it).
## build/ goes first: setuptools would otherwise pack files deleted since the last build.
wheel: venv
	rm -rf build .whl/q8kv-*.whl
	$(BIN)/python -m pip wheel -q --no-deps -w .whl .

bench: venv
	$(BIN)/python benchmarks/service_latency.py $(ARGS)

## SmolLM2 generating text with its attention on q8kv (a numpy server is started unless
## ARGS="--target host:port"); needs the hf extra (in dev, the default EXTRAS).
demo: venv
	$(BIN)/python -m q8kv.hf.demo $(ARGS)

## KLD / perplexity / top-1 of the Q8 cache vs an fp32 cache (docs/accuracy.md).
accuracy: venv
	$(BIN)/python benchmarks/accuracy.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .whl/q8kv-*.whl
