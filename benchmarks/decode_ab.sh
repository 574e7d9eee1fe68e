#!/usr/bin/env bash
# Before/after of the decode step, interleaved: decode_profile.py from a checkout of REV (default ecc6111,
# the engine before the fast path) and from this tree, ROUNDS times each, alternating; then the medians.
#   bash benchmarks/decode_ab.sh [REV] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:-ecc6111}; ROUNDS=${2:-3}
PY=$PWD/.venv/bin/python
OLD=$(mktemp -d)/before
git worktree add -f "$OLD" "$REV" -q
cp benchmarks/decode_profile.py benchmarks/common.py "$OLD/benchmarks/"
for i in $(seq 1 "$ROUNDS"); do
  (cd "$OLD/benchmarks" && PYTHONPATH="$OLD" $PY decode_profile.py --out "ab_before_$i" > /dev/null 2>&1)
  cp "$OLD/benchmarks/results/ab_before_$i.json" benchmarks/results/
  (cd benchmarks && $PY decode_profile.py --out "ab_after_$i" > /dev/null 2>&1)
done
git worktree remove --force "$OLD"
$PY - "$ROUNDS" "$REV" <<'PY'
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import save
n, rev = int(sys.argv[1]), sys.argv[2]
res = Path("benchmarks/results")
out = {"before_rev": rev, "rounds": n}
for b in ("batch1", "batch8"):
    for side in ("before", "after"):
        runs = [json.loads((res / f"ab_{side}_{i}.json").read_text())[b] for i in range(1, n + 1)]
        out[f"{b}_{side}_wall_ms"] = [r["wall_ms_per_step"] for r in runs]
        out[f"{b}_{side}_mm_ms"] = [r["mm_ms_per_step"] for r in runs]
    out[f"{b}_speedup_median"] = round(statistics.median(out[f"{b}_before_wall_ms"]) /
                                       statistics.median(out[f"{b}_after_wall_ms"]), 2)
for i in range(1, n + 1):
    for side in ("before", "after"):
        (res / f"ab_{side}_{i}.json").unlink()
print(out)
print("wrote", save("decode_ab", out))
PY
