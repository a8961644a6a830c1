#!/usr/bin/env bash
# One device call (~1.3 min a variant, one H100): the work around the SISO chunk kernels split other ways
# (docs/perf-notes.md, seventeenth session), each variant one env setting, at 8 x 4096 and 2 x 16384, after the
# GPU tests of those paths. JSON and logs under ${OUT:-ab-passes}/. (The chained chunk-state variants this ran
# first are commit bb61857.)
#   bash scripts/ab_passes.sh [variant ...]   (default: base dx-in-dk dcsl-in-dx)
# Variants: base (GPU defaults); store (per-head dq / dk sums, HYBRID_SCAN_GROUP_SUM=store); atomic (forced);
# dx-in-dk (HYBRID_SCAN_DX_IN_DK=1); dcsl-in-dx (HYBRID_SCAN_DCSL_IN_DX=1).
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-passes
timeout 240 python -m pytest -q -m gpu tests/test_mamba3_triton.py -k "group_sum or splits" 2>&1 | tail -5 | tee "$out/tests.log"
for variant in ${@:-base dx-in-dk dcsl-in-dx}; do
  case $variant in
    base) env=() ;;
    store) env=(HYBRID_SCAN_GROUP_SUM=store) ;;
    atomic) env=(HYBRID_SCAN_GROUP_SUM=atomic) ;;
    dx-in-dk) env=(HYBRID_SCAN_DX_IN_DK=1) ;;
    dcsl-in-dx) env=(HYBRID_SCAN_DCSL_IN_DX=1) ;;
    *) echo "unknown variant $variant"; exit 2 ;;
  esac
  env "${env[@]}" python scripts/ab_scan.py --tag "$variant" --shapes 8x4096,2x16384 --out "$out/$variant.json" 2>&1 \
    | grep -v -i warn
done
