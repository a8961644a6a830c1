#!/usr/bin/env bash
# One device call (~4 min, one H100): the Mamba-3 mixer's gate backward inside the scan's dq / dk kernels
# (HYBRID_MIXER_GATE_IN_SCAN=1, the default) against its own launch (=0), on the training step of Mx12 at 2 x 16384
# (host_vs_gpu_train.py: wall, kernel time, heaviest kernels), after the mixer's GPU tests. Logs under ${OUT:-ab-gate}/.
#   bash scripts/ab_gate.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-gate
timeout 120 python -m pytest -q -m gpu tests/test_mamba3_siso_mixer.py 2>&1 | tail -3 | tee "$out/tests.log"
for mode in 1 0 1; do
  HYBRID_MIXER_GATE_IN_SCAN=$mode python scripts/host_vs_gpu_train.py --seq 16384 Mx12 > "$out/gate$mode.log" 2>&1
  echo "[gate in scan: $mode]"; grep -E " @ |_chunk_scan_bwd_d[qk]|_gate_bwd" "$out/gate$mode.log" | cut -c1-120
done
