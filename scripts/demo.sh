#!/usr/bin/env bash
# The main job: set up .venv if missing, then fine-tune MiniLM with LoRA on Rotten Tomatoes,
# save, load into a fresh model, merge and check. Extra arguments go to the example
# (e.g. --quick, --qlora).
#   bash scripts/demo.sh --llm [--quick] [--qlora | --dora]
# runs the causal LM version instead: SmolLM2-135M-Instruct learns to answer " positive" /
# " negative" through its chat template (examples/finetune_causal_lm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
EXAMPLE=examples/finetune_sentiment.py
if [ "${1:-}" = "--llm" ]; then
  EXAMPLE=examples/finetune_causal_lm.py
  shift
fi
exec .venv/bin/python "$EXAMPLE" "$@"
