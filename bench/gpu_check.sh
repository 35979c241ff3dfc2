#!/usr/bin/env bash
# The whole benchmark on the GPU machine (Python 3.12, torch, triton, numpy, click, matplotlib,
# pytest preinstalled; no network, no Rust). Run from the repository root with the wheel built
# elsewhere in wheelhouse/ (see bench/README.md):
#
#   FINEGPT_COMMIT=$(git rev-parse --short=12 HEAD) OUT=/tmp/out bash bench/gpu_check.sh
#
# Budget (seconds, each step killed at its limit; a failed step is recorded and the next one runs):
#   setup 35 + GPU tests 45 + kernels 75 + train (every tier emulated) 115 + loader 50 = 320 s (writing the
#   100M-token loader shard takes ~5 s of it).
# The train step stops starting new paths after 85 s and is interrupted (SIGINT, which it turns into a
# partial result) at its limit. Leaves in $OUT (at most 6 files, as the device tool returns 8):
#   results/results.json, results/report.md, results/{loader,kernels,train}.png, gpu_check.log
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?set OUT to the directory that receives the results}
RESULTS="$OUT/results"
LOG="$OUT/gpu_check.log"
SITE=/tmp/finegpt-site
WORK=/tmp/finegpt-gpu-work  # not the repo root, so the source finegpt/ (no compiled module) is not imported
mkdir -p "$RESULTS" "$WORK"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -z "${FINEGPT_COMMIT:-}" ]; then
    FINEGPT_COMMIT=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || true)
fi
export FINEGPT_COMMIT

SUMMARY=()
# step NAME LIMIT_S CMD...: run CMD with a time limit, log its output, record how it ended.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    (cd "$WORK" && timeout -s INT -k 15 "$limit" "$@") 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out"; elif [ "$rc" != 0 ]; then status="failed (exit $rc)"; fi
    SUMMARY+=("$(printf '%-12s %-18s %5ss' "$name" "$status" $((SECONDS - start)))")
}

step environment 15 bash -c "nvidia-smi; python3 -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
# The newest wheel only: two versions of one package would stop the install.
WHEEL=$(ls -t "$REPO"/wheelhouse/finegpt-*.whl 2>/dev/null | head -1)
step install 20 bash -c "rm -rf '$SITE' && python3 -m pip install -q --no-deps --no-index --target '$SITE' '${WHEEL:-no wheel in wheelhouse/: see bench/README.md}' && PYTHONPATH='$SITE' python3 -c 'import finegpt, finegpt._loader, kernels; print(\"finegpt\", finegpt.__version__, \"from\", finegpt.__file__)'"
export PYTHONPATH="$SITE"

step gpu-tests 45 python3 -m pytest "$REPO/tests" -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors
step kernels 75 python3 -m finegpt bench kernels --out "$RESULTS"
step train 115 python3 -m finegpt bench train --all-tiers --burn-in 2 --steps 5 --time-budget 85 --out "$RESULTS"
step loader 50 python3 -m finegpt bench loader --device cuda --out "$RESULTS"

echo | tee -a "$LOG"
(cd "$WORK" && timeout 30 python3 - "$RESULTS/results.json" <<'EOF') 2>&1 | tee -a "$LOG"
import json, sys
from finegpt.bench.report import default_out_dir, format_value
from finegpt.console import format_table
try:
    data = json.load(open(sys.argv[1]))
except OSError as err:
    sys.exit(f"no results: {err}")
rows = []
for name, section in data["sections"].items():
    if section["skipped"]:
        rows.append([name, "skipped", section["skipped"][:80]])
    for key, value in section["headline"].items():
        rows.append([name, key, format_value(value)])
print(f"{data['environment']['device']}, torch {data['environment']['torch']}, commit {data['environment']['commit']}")
print(format_table(rows, ["section", "headline", "value"]))
print(f"commit these results as {default_out_dir(data['environment'])}/, then: finegpt bench report bench/results")
EOF
{
    echo
    echo "step         status             time"
    printf '%s\n' "${SUMMARY[@]}"
    echo "results in $RESULTS ($(ls "$RESULTS" | tr '\n' ' '))"
} | tee -a "$LOG"
