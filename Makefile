# kaeru: `make run` shows it working, `make test` proves it. Needs only Python 3.11+ and make;
# everything else comes from pip into .venv.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after each install: pip runs again only when pyproject.toml or the lock is newer.
STAMP := $(VENV)/.kaeru-installed
# Every version installed, pinned for every platform and Python >= 3.11 (`make lock` writes it).
LOCK := requirements.lock

.DEFAULT_GOAL := help
.PHONY: help run test lint lock clean

help:
	@echo "make run    start Temporal, mail catcher, worker and API, and play the demo shopper"
	@echo "make test   lint, type-check and run every test"
	@echo "make lint   ruff and mypy only (and whether requirements.lock is current)"
	@echo "make lock   resolve requirements.lock again after pyproject.toml's dependencies" \
	     "changed (UPGRADE=1: newest versions of everything)"
	@echo "make clean  remove caches and build files (keeps .venv and .kaeru/)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "kaeru needs Python 3.11 or newer; $(PYTHON) is $$($(PYTHON) --version 2>&1)." \
		     "Run: make PYTHON=python3.12 ..." >&2; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { \
		echo "could not create $(VENV): on Debian/Ubuntu install python3-venv" \
		     "(apt install python3-venv), then run make again" >&2; rm -rf $(VENV); exit 1; }

# Constraints, not requirements: pip installs what pyproject asks for, at the lock's versions.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[dev]'
	@touch $@

# uv keeps the versions already in the lock unless UPGRADE=1, then writes the fingerprint line
# that `make lint` compares with pyproject.toml; the next make target installs the new lock.
lock: $(STAMP)
	$(BIN)/uv pip compile --quiet --universal --python-version 3.11 pyproject.toml --extra dev \
		$(if $(UPGRADE),--upgrade) --custom-compile-command 'make lock' -o $(LOCK)
	$(BIN)/python infra/lock.py stamp

run: $(STAMP)
	$(BIN)/kaeru dev --demo

lint: $(STAMP)
	@$(BIN)/python infra/lock.py check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

# Two worker processes (pytest-xdist), each with its own servers: the tests mostly wait on
# Temporal, SMTP, HTTP and databases, so two halve the time on a 2-core machine.
test: lint
	@$(BIN)/pytest -q -n 2; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests; that is a failure" >&2; fi; \
	exit $$status

clean:
	rm -rf build dist *.egg-info .mypy_cache .pytest_cache .ruff_cache $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
