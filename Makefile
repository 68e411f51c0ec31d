# The README's two commands: `make demo` and `make test`. Everything else here serves them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
POLICY ?= policies/example.yaml
# apt-get needs root; use sudo when there is one and we are not root.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

.PHONY: demo test install install-test system-deps lint bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[cpu]"

install-test: $(BIN)/activate
	$(BIN)/pip install --quiet -e ".[test]"

# Test needs outside PyPI: a real redis-server for the Redis-backed tests, Debian's chromium for the
# dashboard's browser tests (Playwright drives it; no browser download).
system-deps:
	@missing=""; command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  [ -z "$$missing" ] || { $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }

# The local stack on the embedded default (no Redis): models, certificates, sidecars, controller +
# dashboard, gateway, Envoy, and demo traffic in which the canary fails; Ctrl-C stops it all.
demo: install
	$(BIN)/cohortgate up --demo --policy $(POLICY)

test: install-test system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check .

# The side-by-side benchmarks (not timed tests); h2load and wrk are their load generators.
bench: install-test
	@command -v h2load >/dev/null && command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nghttp2-client wrk >/dev/null; }
	$(BIN)/python bench/bench_gateway.py
	$(BIN)/python bench/bench_sidecar.py
	$(BIN)/python bench/bench_detection.py --mode both
	$(BIN)/python bench/bench_reload.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
