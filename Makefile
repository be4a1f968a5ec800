# pdserve developer entry points. `make test` and `make run` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on accelerator hosts set TORCH_SPEC to the matching build.
TORCH_SPEC ?= torch==2.13.0
# CPU hosts take Mooncake's non-CUDA build (same `mooncake` module); GPU hosts the default one.
MOONCAKE_SPEC ?= mooncake-transfer-engine-non-cuda
# uv installs the rest (about 25 s where pip takes about 170), into the venv that pip put torch
# in (uv would not take the local CPU wheel pip's configuration points at); the index is pip's
# configured one, and pip installs it all if uv fails. Compiled to bytecode as pip does:
# without it the Ray tests' many processes compile the same modules at once (290 s against 150).
UV_SPEC ?= uv==0.13.*
STAMP := $(VENV)/.installed
MODELS ?= models
PACKAGES := engine kv_transfer protos/__init__.py protos/h2.py protos/cluster_token.py protos/cluster_tls.py protos/contract.py protos/cli_help.py worker prefill_worker decode_worker router cluster
PORT ?= 8000
# no: skip what only the tests use (Prometheus, kubectl), as deploy/Dockerfile's image does.
TEST_TOOLS ?= yes

.PHONY: install test test-ray lint format proto tiny-models run run-ray run-offline bench-engine soak certs clean

install: $(STAMP)

# The system packages (one apt-get, run beside pip: they do not depend on each other):
# Mooncake's transfer engine links libibverbs even when it speaks TCP; the registry tests start
# their own Redis server; promtool checks deploy/prometheus and the integration test runs a real
# Prometheus server; the deploy tests render deploy/k8s with `kubectl kustomize`; the Ray tests
# need `ip`. torch first and pinned: an unpinned requirement pulls the CUDA build.
$(STAMP): pyproject.toml
	@want=""; lean=""; \
	ldconfig -p | grep -q libibverbs.so.1 || want="$$want libibverbs1"; \
	command -v redis-server >/dev/null || want="$$want redis-server"; \
	command -v openssl >/dev/null || want="$$want openssl"; \
	command -v ip >/dev/null || want="$$want iproute2"; \
	[ "$(TEST_TOOLS)" != yes ] || command -v promtool >/dev/null || lean="$$lean prometheus"; \
	[ "$(TEST_TOOLS)" != yes ] || command -v kubectl >/dev/null || lean="$$lean kubernetes-client"; \
	apt_install() { \
	  { [ -z "$$want" ] || apt-get install -y -q $$want; } && \
	  { [ -z "$$lean" ] || apt-get install -y -q --no-install-recommends $$lean; }; }; \
	apt_pid=; \
	if [ -n "$$want$$lean" ]; then \
	  echo "installing$$want$$lean (apt, beside pip)"; \
	  { apt_install || { apt-get update -q && apt_install; }; } >/dev/null 2>&1 & apt_pid=$$!; \
	fi; \
	{ test -x $(PY) || $(PYTHON) -m venv $(VENV); } && \
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(UV_SPEC)" && \
	{ idx=$$($(PY) -m pip config get global.index-url 2>/dev/null); \
	  UV_DEFAULT_INDEX="$${idx:-https://pypi.org/simple}" $(VENV)/bin/uv pip install -q --compile-bytecode \
	    --python $(PY) -e ".[dev,bench]" "$(MOONCAKE_SPEC)" || \
	  { echo "uv pip install failed: installing with pip"; \
	    $(PY) -m pip install -q -e ".[dev,bench]" "$(MOONCAKE_SPEC)"; }; }; \
	pip_rc=$$?; \
	apt_rc=0; [ -z "$$apt_pid" ] || wait $$apt_pid || apt_rc=$$?; \
	[ $$apt_rc = 0 ] || echo "apt-get install$$want$$lean failed: install them by hand (see the Makefile)"; \
	[ $$pip_rc = 0 ] && [ $$apt_rc = 0 ]
	touch $@

proto: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/*.proto

# Test processes (pytest-xdist): `auto` is one a core, at most 4; each file runs whole in one
# process, so a module's fixtures are built once. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= auto

# The Ray tests first: they mostly wait (clusters starting, actors restarting: about 70
# CPU-seconds in 200), which leaves a core to whatever runs beside `make test` (CI's lint).
# Beside the suite they starved and their daemons burned CPU for the suite's whole run.
test: install
	$(MAKE) --no-print-directory test-ray
	$(PY) -m pytest -q tests --ignore=tests/ray -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile

# Ray refuses a loopback node address, and test traffic must stay on loopback: the Ray
# tests run in a private network namespace that has only `lo` (needs root, as CI is).
test-ray: install
	@if [ "$$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null; then \
	  unshare -n sh -c 'ip link set lo up && $(PY) -m pytest -q tests/ray'; \
	else \
	  echo "skipping tests/ray: a loopback-only network namespace needs root, unshare and ip"; \
	fi

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy $(PACKAGES) bench tests

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

tiny-models: install
	$(PY) -m engine.testing.tiny_models --out $(MODELS)

# Router + one prefill + one decode worker on the embedded default model (a tiny
# Qwen3-MoE checkpoint generated on first use), on the CPU, until Ctrl-C.
run: install
	$(VENV)/bin/pdserve local --port $(PORT)

# The same through Ray: a one-machine Ray cluster places and supervises the processes
# (Ray binds this machine's network address, so `make run` stays on the no-Ray launcher).
run-ray: install
	$(VENV)/bin/pdserve up --foreground

# The offline engine alone, no services.
run-offline: install
	$(PY) -m engine.cli --chat --prompt "What is a KV cache?" --prompt "Explain batching" --max-tokens 24

# The chaos soak (bench/soak.py): mixed load on the embedded default while workers and Redis
# are killed and stopped and KV writes are delayed and dropped; SOAK_S seconds (CI runs a
# 30 s form in tests/e2e/test_soak.py).
SOAK_S ?= 300
soak: install
	$(PY) -m bench.soak --duration $(SOAK_S)

# A local CA and the cluster's certificate for --tls-dir (README: Security).
CERTS_DIR ?= certs
certs:
	sh deploy/certs.sh $(CERTS_DIR)

bench-engine: tiny-models
	$(PY) -m bench.engine --model-path $(MODELS)/qwen3-moe --decode 1x128,16x128,64x128 --prefill 64x128,8x512

clean:
	rm -rf $(VENV) $(MODELS) .pytest_cache .mypy_cache .ruff_cache
