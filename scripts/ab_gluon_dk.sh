#!/usr/bin/env bash
# One device call (~4 min, one H100): the Gluon key-side kernel (kernels/mamba3/gluon_siso_dk.py) against the Triton
# one, its GPU tests first, then the scan at 8 x 4096 and 2 x 16384 with each (docs/perf-notes.md, eighteenth
# session). JSON and logs under ${OUT:-ab-gluon-dk}/.
#   bash scripts/ab_gluon_dk.sh [variant ...]     (variants: triton gluon32 gluon16 gluon16r168 gluon32inplace
#   gluon32inplacer168; default the first three). SHAPES, SKIP_TESTS=1, TESTS_K (a pytest -k filter) and
#   HYBRID_SCAN_DK_INPLACE (for the tests) narrow a call.
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-gluon-dk
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python -m pytest -q -m gpu tests/test_mamba3_gluon_dk.py -x ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -25 | tee "$out/tests.log"
fi
shapes=${SHAPES:-8x4096,2x16384}
run() {  # tag kernel column-block [register cap] [rotated q in place]
  HYBRID_SCAN_DK=$2 HYBRID_SCAN_DK_NB=$3 HYBRID_SCAN_DK_MAXNREG=${4:-0} HYBRID_SCAN_DK_INPLACE=${5:-0} \
    python scripts/ab_scan.py --tag "$1" --shapes "$shapes" --out "$out/$1.json" 2>&1 | grep -v -i warn
}
for variant in ${@:-triton gluon32 gluon16}; do
  case $variant in
    triton) run triton triton 32 ;;
    gluon32) run gluon32 gluon 32 ;;
    gluon16) run gluon16 gluon 16 ;;
    gluon16r168) run gluon16r168 gluon 16 168 ;;
    gluon32inplace) run gluon32inplace gluon 32 0 1 ;;
    gluon32inplacer168) run gluon32inplacer168 gluon 32 168 1 ;;
  esac
done
