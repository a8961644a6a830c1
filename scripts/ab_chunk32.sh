#!/usr/bin/env bash
# One device call (~6 min, one H100): the SISO scan at chunk 32 against chunk 64, with and without register caps
# offered to every tuned kernel (HYBRID_TRITON_CAPS), at 8 x 4096 and 2 x 16384. JSON under ${OUT:-ab-chunk32}/.
#   bash scripts/ab_chunk32.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-chunk32
caps="4,1,168;4,2,168;8,1,128"
run() {  # tag chunk caps
  HYBRID_TRITON_CAPS=$3 python scripts/ab_scan.py --tag "$1" --chunk "$2" --shapes 8x4096,2x16384 --out "$out/$1.json" 2>&1 \
    | grep -v -i warn
}
run c64 64 ""
run c32 32 ""
run c32-caps 32 "$caps"
run c64-caps 64 "$caps"
