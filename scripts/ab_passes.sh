#!/usr/bin/env bash
# One device call (~8 min, one H100): the passes around the SISO chunk kernels (docs/perf-notes.md, seventeenth
# session): dq / dk group sums by atomics (HYBRID_SCAN_GROUP_SUM) and chunk states passed in the launch that forms
# them (HYBRID_SCAN_CHAIN), each alone and together, against the two-launch, per-head path, at 8 x 4096 and
# 2 x 16384; the GPU tests of both paths first. JSON and logs under ${OUT:-ab-passes}/.
#   bash scripts/ab_passes.sh [variant ...]     (variants: base atomic chain chain-w4 both; default all)
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-passes
timeout 200 python -m pytest -q -m gpu tests/test_mamba3_triton.py -k "chain or group_sum" 2>&1 | tail -5 | tee "$out/tests.log"
run() {  # tag group-sum chain [chain warps]
  HYBRID_SCAN_GROUP_SUM=$2 HYBRID_SCAN_CHAIN=$3 HYBRID_SCAN_CHAIN_WARPS=${4:-8} \
    python scripts/ab_scan.py --tag "$1" --shapes 8x4096,2x16384 --out "$out/$1.json" 2>&1 | grep -v -i warn
}
for v in "${@:-base atomic chain chain-w4 both}"; do
  for variant in $v; do
    case $variant in
      base) run base store off ;;
      atomic) run atomic atomic off ;;
      chain) run chain store on ;;
      chain-w4) run chain-w4 store on 4 ;;
      both) run both atomic on ;;
    esac
  done
done
