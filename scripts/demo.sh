#!/usr/bin/env bash
# The main job: set up .venv if missing, then fine-tune MiniLM with LoRA on Rotten Tomatoes,
# save, load into a fresh model, merge and check. Extra arguments go to the example
# (e.g. --quick, --qlora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/finetune_sentiment.py "$@"
