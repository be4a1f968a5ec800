# pdserve developer entry points. `make test` and `make run` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on accelerator hosts set TORCH_SPEC to the matching build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
MODELS ?= models

.PHONY: install test lint format tiny-models run bench-engine clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned requirement pulls the CUDA build.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

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
