# The two commands a user needs: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv from requirements.lock, so each works alone on a
# fresh clone with only Python 3.11 and access to PyPI.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed

.PHONY: install demo up test test-unit lock clean browser

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(BIN)/python -m uv pip install -q --python $(BIN)/python --require-hashes -r requirements.lock
	$(BIN)/python -m uv pip install -q --python $(BIN)/python --no-deps -e .
	@# Byte-compile once: where PYTHONDONTWRITEBYTECODE is set, imports would
	@# otherwise recompile feast, river and friends on every start (seconds each).
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/freshet demo

up: $(STAMP)
	$(BIN)/freshet up

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The dashboard's browser tests drive Debian's Chromium through Playwright (Playwright's own
# browser download is not reachable from every machine): installed here when missing and root.
browser:
	@sh tests/browser/ensure_chromium.sh

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# Re-pin every dependency after editing pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m uv pip compile --python-version 3.11 --extra test --generate-hashes --no-header pyproject.toml -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache
