#!/usr/bin/env bash
# The checks that need a GPU, on a machine that has one and an environment with torch (CUDA
# build), pytest, hypothesis, peft and transformers:
#   bash scripts/gpu_check.sh tests    # conformance suite + device tests on CUDA, core tests
#   bash scripts/gpu_check.sh bench    # the benchmarks with --device cuda
# Logs and JSON go to $OUT (default runs/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
rc=0
case "${1:-tests}" in
  tests)
    ADAPTKIT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/conformance \
      tests/test_device.py 2>&1 | tail -15 | tee "$OUT/tests_cuda.log"; rc=$((rc | PIPESTATUS[0]))
    # the CPU tests under this machine's torch (portability across torch versions)
    "$PY" -m pytest -q -p no:cacheprovider -x tests/methods tests/properties tests/test_inject.py \
      tests/test_errors.py tests/test_peft_compat.py tests/test_compile.py 2>&1 | tail -15 \
      | tee "$OUT/tests_cpu.log"; rc=$((rc | PIPESTATUS[0]))
    ;;
  bench)
    for b in "bench_layers.py --device cuda" "bench_model.py --device cuda" \
             "bench_methods.py --device cuda --dtypes fp32,bf16" "bench_nf4.py --device cuda"; do
      name=${b%%.py*}
      "$PY" benchmarks/$b --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1; r=$?
      echo "== $b: exit $r"; tail -25 "$OUT/$name.log"; rc=$((rc | r))
    done
    ;;
esac
exit $rc
