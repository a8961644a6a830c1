#!/usr/bin/env bash
# One device call (~5 min, one H100): dq programs walking several chunks with a software-pipelined loop
# (HYBRID_DQ_WALK=W,S; kernels/mamba3/triton_siso_bwd.py) against one chunk per program, at 8 x 4096 and 2 x 16384.
#   bash scripts/ab_dq_walk.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-dq-walk
i=0
for spec in 1 2,1 2,2 4,2 1; do
  i=$((i + 1))
  HYBRID_DQ_WALK=$spec python scripts/ab_scan.py --tag "walk-$spec" --shapes 8x4096,2x16384 --out "$out/$i-walk-${spec/,/_}.json" 2>&1 \
    | grep -v configs | grep -v -i warn
done
