#!/usr/bin/env bash
# One device call (one H100): the Gluon chunk kernels (kernels/mamba3/gluon_siso.py, gluon_siso_bwd.py) against the
# Triton ones, their GPU equality tests first, then the scan at 8 x 4096 and 2 x 16384 per variant
# (docs/perf-notes.md, eighteenth session). JSON and logs under ${OUT:-ab-gluon}/.
#   bash scripts/ab_gluon.sh [variant ...]
# Variants (each names what runs in Gluon; the rest runs in Triton): triton; gluon32 (dk); gluon16 / gluon16r168
# (dk, 16-pair blocks, uncapped / at 168 registers); gluonqk (dq, dk); gluonfwd (chunk output, dq, dk; the
# default); gluondx (gluonfwd and dx); gluonfwdr0 (gluonfwd, the chunk output kernel without its register cap);
# gluonall (chunk state, chunk output, dq, dx, dk); gluonall0 (gluonall with the outputs stored straight from the
# MMA layouts); gluondirect (gluondx relaunched by DirectLaunch). Default: triton gluonfwd gluondx gluonall. SHAPES,
# SKIP_TESTS=1 and TESTS_K (a pytest -k filter) narrow a call.
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-gluon
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 420 python -m pytest -q -m gpu tests/test_mamba3_gluon.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tail -25 | tee "$out/tests.log"
fi
shapes=${SHAPES:-8x4096,2x16384}
run() {  # tag, then VAR=value settings for this run
  local tag=$1
  shift
  env HYBRID_SCAN_STATE=triton HYBRID_SCAN_FWD=triton HYBRID_SCAN_DQ=triton HYBRID_SCAN_DX=triton HYBRID_SCAN_DK=triton "$@" \
    python scripts/ab_scan.py --tag "$tag" --shapes "$shapes" --out "$out/$tag.json" 2>&1 | grep -v -i warn
}
fwd="HYBRID_SCAN_FWD=gluon HYBRID_SCAN_DQ=gluon HYBRID_SCAN_DK=gluon"
all="$fwd HYBRID_SCAN_STATE=gluon HYBRID_SCAN_DX=gluon"
for variant in ${@:-triton gluonfwd gluondx gluonall}; do
  case $variant in
    triton) run triton ;;
    gluon32) run gluon32 HYBRID_SCAN_DK=gluon ;;
    gluon16) run gluon16 HYBRID_SCAN_DK=gluon HYBRID_SCAN_GLUON_NB=16 ;;
    gluon16r168) run gluon16r168 HYBRID_SCAN_DK=gluon HYBRID_SCAN_GLUON_NB=16 HYBRID_SCAN_DK_MAXNREG=168 ;;
    gluonqk) run gluonqk HYBRID_SCAN_DQ=gluon HYBRID_SCAN_DK=gluon ;;
    gluonfwd) run gluonfwd $fwd ;;
    gluondx) run gluondx $fwd HYBRID_SCAN_DX=gluon ;;
    gluonfwdr0) run gluonfwdr0 $fwd HYBRID_SCAN_FWD_MAXNREG=0 ;;
    gluonall) run gluonall $all ;;
    gluonall0) run gluonall0 $all HYBRID_SCAN_GLUON_COALESCE=0 ;;
    gluondirect) run gluondirect $fwd HYBRID_SCAN_DX=gluon HYBRID_GLUON_DIRECT=1 ;;
  esac
done
