#!/usr/bin/env bash
# The GPU check, as ONE command on a GPU machine (no network needed): the GPU tests, then
# benchmarks/gpu_decode.py. Everything it writes lands in $OUT (default benchmarks/results/gpu_run):
# gpu_info.txt, gpu_tests.log, gpu_decode.log, gpu_decode.json, gpu_report.md (its tables, also printed last).
# About 3.5 minutes on an H200 (BENCH_ARGS="--skip hf_":
# transformers' eager generate takes ~25 s more). The compress test needs constriction (pip install constriction).
#   bash benchmarks/gpu_check.sh            # from the repository root
# Knobs (environment): TESTS (pytest arguments), TEST_TIMEOUT / BENCH_TIMEOUT (seconds), BUDGET (seconds
# after which gpu_decode.py skips its remaining arms), BENCH_ARGS (e.g. "--skip hf_,afford_eager"). The GPU tests
# compile every int4 tile of the sweep (Triton, ~1 s each): 240 s is their default budget.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/gpu_info.txt" 2>&1
cat "$OUT/gpu_info.txt"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -p no:cacheprovider ${TESTS:-tests/test_gpu.py tests/test_graphs.py} 2>&1 | tee "$OUT/gpu_tests.log"
tests=$?                                  # the benchmark runs either way; the exit status reports both
timeout ${BENCH_TIMEOUT:-330} $PY benchmarks/gpu_decode.py --out "$OUT" --budget ${BUDGET:-250} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_decode.log"
bench=$?
# the run's tables (benchmarks/report.py's GPU section), last, where a caller reading only the output's tail sees them
$PY -c "import json, sys; sys.path.insert(0, 'benchmarks'); import report; report.gpu_decode(json.load(open(sys.argv[1])))" \
    "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_report.md" | tail -80 || true
echo "gpu_check: tests exit $tests, benchmark exit $bench"
exit $(( tests != 0 ? tests : bench ))
