#!/usr/bin/env bash
# One device call (~6 min, one H100): Triton kernels relaunched directly (kernels/launch.py) against through the JIT,
# HYBRID_TRITON_DIRECT=1 / 0: host time per Mamba-3 function (host_profile_step.py --inclusive) and the training step
# at 8 x 4096 (host_vs_gpu_train.py), direct first, then JIT, then direct again (the host's speed drifts). Writes one
# log per step under ${OUT:-ab-direct}/ and prints the summary lines (docs/perf-notes.md, fifteenth session).
#   bash scripts/ab_direct_launch.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-direct
summary() { grep -E " @ |kernels; idle" "$1" | cut -c1-160; }
run=0
for direct in 1 0 1; do
  run=$((run + 1))
  HYBRID_TRITON_DIRECT=$direct python scripts/host_profile_step.py --top 3 --inclusive MMMAx3 > "$out/profile_$run.log" 2>&1
  echo "[run $run, HYBRID_TRITON_DIRECT=$direct]"
  grep -E "host forward|Mamba3.mixer|^--- (forward|backward): [0-9]|mamba3_siso_mixer|chunk_forward|mamba3_siso_chunk_bwd|_tuned\[grid\]" \
    "$out/profile_$run.log" | cut -c1-120
  HYBRID_TRITON_DIRECT=$direct python scripts/host_vs_gpu_train.py MMMAx3 Ax12 > "$out/train_$run.log" 2>&1
  summary "$out/train_$run.log"
done
