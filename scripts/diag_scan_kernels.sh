#!/usr/bin/env bash
# Each (chunk kernel, launch config) of the SISO scan checked in its own process, in parallel, with blocking
# launches: an illegal address then names its kernel and config instead of ending the whole check.
#   bash scripts/diag_scan_kernels.sh [--packed]
cd "$(dirname "$0")/.."
export HYBRID_TRITON_TUNE=fixed CUDA_LAUNCH_BLOCKING=1 PACKED=${1:-}
for k in _chunk_scan_fwd _chunk_scan_bwd_dq _chunk_scan_bwd_dx _chunk_scan_bwd_dk; do
  for c in 4,1 4,2 4,3 8,1 8,2 8,3; do
    echo "$k $c"
  done
done | xargs -P 6 -L 1 sh -c 'out=$(python scripts/check_scan_determinism.py $PACKED --kernel $0 --config $1 2>&1 | grep -E "_tuned\\[|identical|Error" | tail -2 | tr -s " " | tr "\\n" " "); echo "$0 $1: $out"' 
