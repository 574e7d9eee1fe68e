#!/usr/bin/env bash
# Every benchmark, one after another on a quiet machine (each writes benchmarks/results/NAME.json).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-../.venv/bin/python}
mkdir -p results/logs
for cmd in "default_pair.py" "matmul_micro.py" "forward_overhead.py" "bf16_panels.py" "verify_rows.py" "decode_profile.py" "decode_vs_hf.py" \
           "spec_vs_hf.py --per-category 4" "batch_invariance.py" "compile_probe.py" "quant.py" \
           "mfa_vs_gqa.py --steps 300" "serve_load.py" "smartspec_load.py" "chunked.py --budgets 2048 512 256 128 64" \
           "prefix.py" "selfconsistency.py" "soak.py --minutes 10" "fidelity.py" "sparse_long.py"; do
  name=${cmd%%.py*}
  echo "== $cmd ($(date +%H:%M:%S))"
  /usr/bin/time -f "$name: %e s" $PY $cmd > "results/logs/$name.log" 2>&1 || echo "$name FAILED"
done
