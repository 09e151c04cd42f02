# The two commands of README.md: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-fast lint format bench services-up services-down cluster-up cluster-down cluster-status clean

venv:
	scripts/bootstrap-python

# Quiet: one line per setup step, then the status; the details go to var/log/ (scripts/demo).
demo:
	@scripts/demo

# The whole suite: the unit tests on every core (as test-fast), then the e2e (real Slurm over SSH, real PostgreSQL
# and Redis) and Chromium tests one at a time, since they share the one local cluster; then the database-bound
# catalog tests, the proxy's plain-SQL lookups, the shared counts in both stores, the model services and allocations
# (their SQL and row locks), the usage summaries and the migrations once more with PostgreSQL as the database and
# Redis as the broker and cache, as in production.
test: venv
	scripts/local-cluster up
	scripts/local-services up
	scripts/browser-deps
	PORTAL_VAR_DIR=$(CURDIR)/var/test $(BIN)/pytest -n auto -m "not e2e and not browser"
	PORTAL_VAR_DIR=$(CURDIR)/var/test $(BIN)/pytest -m "e2e or browser"
	set -a && . var/local-services/env && set +a && PORTAL_VAR_DIR=$(CURDIR)/var/test $(BIN)/pytest -p no:cacheprovider tests/catalog tests/jobs/use/test_targets.py tests/jobs/use/test_shared_counts.py tests/jobs/use/test_fairshare.py tests/jobs/sessions/test_sharing.py tests/jobs/sessions/test_listing.py tests/jobs/usage tests/jobs/operations tests/jobs/services tests/jobs/allocations tests/test_migrations.py

# Unit tests only, for a quick loop while editing (no cluster needed), one pytest-xdist worker a core.
test-fast: venv
	$(BIN)/pytest -n auto -m "not e2e and not browser"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Installs the baselines' nginx (scripts/bench-deps) and brings up the local cluster; before each benchmark, a line
# saying what it measures and its target.
bench: venv
	@scripts/bench

services-up:
	scripts/local-services up

services-down:
	scripts/local-services down

cluster-up:
	scripts/local-cluster up

cluster-down:
	scripts/local-cluster down

cluster-status:
	scripts/local-cluster status

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
