#!/usr/bin/env bash
# One device call (one H100): the Gluon backward kernels (kernels/mamba3/gluon_siso_bwd.py) against the Triton ones,
# their GPU equality tests first, then the scan at 8 x 4096 and 2 x 16384 per variant (docs/perf-notes.md, eighteenth
# session). JSON and logs under ${OUT:-ab-gluon-bwd}/.
#   bash scripts/ab_gluon_bwd.sh [variant ...]
# Variants: triton (both Triton), gluon32 (Gluon dk), gluon16 / gluon16r168 (Gluon dk, 16-pair blocks, uncapped / at
# 168 registers), gluonqk (Gluon dq and dk), gluondx (Gluon dk with dx's local-state term, no dx kernel), gluonall
# (all three); default: triton gluon32 gluonqk gluonall. SHAPES, SKIP_TESTS=1 and TESTS_K (a
# pytest -k filter) narrow a call.
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-gluon-bwd
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 python -m pytest -q -m gpu tests/test_mamba3_gluon_bwd.py -x ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -25 | tee "$out/tests.log"
fi
shapes=${SHAPES:-8x4096,2x16384}
run() {  # tag dq-kernel dk-kernel column-block [register cap] [dx in dk]
  HYBRID_SCAN_DQ=$2 HYBRID_SCAN_DK=$3 HYBRID_SCAN_GLUON_NB=$4 HYBRID_SCAN_DK_MAXNREG=${5:-0} HYBRID_SCAN_DK_DX=${6:-0} \
    python scripts/ab_scan.py --tag "$1" --shapes "$shapes" --out "$out/$1.json" 2>&1 | grep -v -i warn
}
for variant in ${@:-triton gluon32 gluonqk gluonall}; do
  case $variant in
    triton) run triton triton triton 32 ;;
    gluon32) run gluon32 triton gluon 32 ;;
    gluon16) run gluon16 triton gluon 16 ;;
    gluon16r168) run gluon16r168 triton gluon 16 168 ;;
    gluonqk) run gluonqk gluon gluon 32 ;;
    gluondx) run gluondx triton gluon 32 0 1 ;;
    gluonall) run gluonall gluon gluon 32 0 1 ;;
  esac
done
