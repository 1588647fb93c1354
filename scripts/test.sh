#!/usr/bin/env bash
# Set up .venv if missing, lint the package (ruff, config in pyproject.toml), then run the
# whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check adaptkit
exec .venv/bin/python -m pytest "$@"
