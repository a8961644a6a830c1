#!/usr/bin/env bash
# One device call (~3 min, one H100): dq / dk group sums by atomics (HYBRID_SCAN_GROUP_SUM) against the per-head
# path, at 8 x 4096 and 2 x 16384, the GPU tests of both paths first (docs/perf-notes.md, seventeenth session).
# The variants measured beside them then live in commits bb61857 (chained chunk states) and bd71df7 (two other
# splits of the backward's work). JSON and logs under ${OUT:-ab-passes}/.
#   bash scripts/ab_passes.sh [variant ...]     (variants: base atomic; default both)
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-passes
timeout 200 python -m pytest -q -m gpu tests/test_mamba3_triton.py -k group_sum 2>&1 | tail -5 | tee "$out/tests.log"
run() {  # tag group-sum
  HYBRID_SCAN_GROUP_SUM=$2 python scripts/ab_scan.py --tag "$1" --shapes 8x4096,2x16384 --out "$out/$1.json" 2>&1 | grep -v -i warn
}
for variant in ${@:-base atomic}; do
  case $variant in
    base) run base store ;;
    atomic) run atomic atomic ;;
  esac
done
