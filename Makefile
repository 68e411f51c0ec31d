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

demo: install
	$(BIN)/cohortgate policy validate $(POLICY)
	$(BIN)/cohortgate policy explain $(POLICY) --path /v2/models/tabular/infer \
	  --sub alice --residency eu --scope predict --identity spiffe://cohortgate.local/app-demo

test: install-test system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
