# Cuneiform — every command a developer or operator needs. `make help` lists them.
# Set-up needs only Python 3.11: uv comes from PyPI into .tools/, everything else from uv.lock.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV := .tools/bin/uv
RUN := $(UV) run --frozen
# The interpreter itself, not a shim: uv would rebuild .venv whenever the path it recorded differs.
export UV_PYTHON := $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy

.DEFAULT_GOAL := help
.PHONY: help install demo stack-up stack-down stack-status test test-unit lint format schema bench bench-datasets bench-routing up down clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(UV):
	@echo "==> installing uv into .tools/ (from PyPI, with $(PYTHON))"
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11"'
	@$(PYTHON) -m venv .tools
	@.tools/bin/pip install --quiet --disable-pip-version-check uv

.venv/.synced: $(UV) uv.lock pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml)
	@echo "==> installing the workspace into .venv/ (uv sync --frozen)"
	@$(UV) sync --frozen --all-packages
	@touch $@

install: .venv/.synced ## Install everything (uv, then every lib and service) into .venv/

demo: install ## Run the main job: the embedded stack, the recorder and a simulated agent fleet (ARGS=...)
	@$(RUN) cuneiform-demo $(ARGS)

stack-up: install ## Start the embedded stack in the background (data in .cuneiform/stack)
	@$(RUN) cuneiform-stack up

stack-down: install ## Stop the embedded stack (its data stays)
	@$(RUN) cuneiform-stack down

stack-status: install ## Is each embedded server healthy?
	@$(RUN) cuneiform-stack status

test: install ## Run the whole test suite against real embedded servers (started and stopped by it)
	@$(RUN) pytest

test-unit: install ## Only the tests that need no server
	@$(RUN) pytest tests/unit

lint: install ## ruff (lint + format check) and mypy
	@$(RUN) ruff check .
	@$(RUN) ruff format --check .
	@$(RUN) mypy libs services/recorder/src services/archiver/src services/readiness/src services/trainer/src services/trainer-dispatcher/src services/deployer/src

format: install ## Format and auto-fix
	@$(RUN) ruff format .
	@$(RUN) ruff check --fix .

schema: install ## Regenerate the committed JSON Schemas (event contract, routing table)
	@$(RUN) python -m cuneiform_sdk.schema

bench: install ## Recorder + archiver benchmark: drain rates vs. ceilings and a naive baseline, latency, archive lag, SDK cost (ARGS=...)
	@$(RUN) python bench/recorder_bench.py $(ARGS)

bench-datasets: install ## Dataset export benchmark: 10,000 trajectories x 10 steps vs. raw read + orjson (ARGS=...)
	@$(RUN) python bench/dataset_bench.py $(ARGS)

bench-routing: install ## Routing benchmark: assignment cost vs. sha256, deployment change → SDK client vs. raw KV watch (ARGS=...)
	@$(RUN) python bench/routing_bench.py $(ARGS)

up: ## Start the compose stack (needs Docker): NATS, PostgreSQL, MinIO, Prometheus, Grafana, services
	docker compose up -d --build

down: ## Stop the compose stack
	docker compose down

clean: ## Remove the virtual environments and local data (asks nothing: the embedded stack must be down)
	rm -rf .venv .tools .cuneiform .pytest_cache .ruff_cache .mypy_cache
