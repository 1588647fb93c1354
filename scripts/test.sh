#!/usr/bin/env bash
# Set up .venv if missing; lint, format-check and type-check the package (ruff, mypy; config
# in pyproject.toml); then run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check adaptkit
.venv/bin/ruff format --check adaptkit
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
