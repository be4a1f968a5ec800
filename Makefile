# pdserve developer entry points. `make test` and `make run` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on accelerator hosts set TORCH_SPEC to the matching build.
TORCH_SPEC ?= torch==2.13.0
# CPU hosts take Mooncake's non-CUDA build (same `mooncake` module); GPU hosts the default one.
MOONCAKE_SPEC ?= mooncake-transfer-engine-non-cuda
STAMP := $(VENV)/.installed
MODELS ?= models

.PHONY: install test lint format proto tiny-models run bench-engine clean

install: $(STAMP)

$(STAMP): pyproject.toml
	# Mooncake's transfer engine links libibverbs even when it speaks TCP.
	@ldconfig -p | grep -q libibverbs.so.1 || { \
	  echo "installing libibverbs1 (needed by Mooncake)"; \
	  (apt-get install -y -q libibverbs1 || (apt-get update -q && apt-get install -y -q libibverbs1)) >/dev/null; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned requirement pulls the CUDA build.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(MOONCAKE_SPEC)"
	touch $@

proto: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto

test: install
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy engine bench tests

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

tiny-models: install
	$(PY) -m engine.testing.tiny_models --out $(MODELS)

# Until the serving cluster lands, `make run` runs the offline engine on the
# embedded default model (a tiny Qwen3-MoE checkpoint generated on first use).
run: install
	$(PY) -m engine.cli --chat --prompt "What is a KV cache?" --prompt "Explain batching" --max-tokens 24

bench-engine: tiny-models
	$(PY) -m bench.engine --model-path $(MODELS)/qwen3-moe

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache
