#!/usr/bin/env bash
# One device call (~3 min, one H100): the scan's kernels now against a stand-in for inputs rotated and biased ahead
# of the scan (scripts/ab_scan.py --proxy prerotated; docs/notes/issue4-scan-next.md, "pre-rotated" lead), at the
# benchmark's 32 heads, 8 x 4096 and 2 x 16384. Prints each variant's f+b and kernel split; JSON under ${OUT:-ab-prerot}/.
#   bash scripts/ab_prerotated.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-prerot
python scripts/ab_scan.py --tag now --shapes 8x4096,2x16384 --out "$out/now.json" 2>&1 | grep -v configs
python scripts/ab_scan.py --tag prerotated-proxy --proxy prerotated --shapes 8x4096,2x16384 --out "$out/proxy.json" 2>&1 \
  | grep -v configs
