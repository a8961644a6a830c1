#!/usr/bin/env bash
# One device call: GPU tests of the Mamba-3 mixer path and the scan's in-place x, then the training step under the
# default HYBRID_MAMBA3_FUSION (mixer) and under compile at 8 x 4096, the default at 2 x 16384, and the scan
# benchmark of record (docs/perf-notes.md, fourteenth session). Writes one log per step under ${OUT:-ab-fusion}/
# and prints the summary lines.
#   bash scripts/ab_fusion.sh [benchmark report name, default mamba3_scan.json]
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-fusion
HYBRID_TRITON_TUNE=fixed timeout 300 python -m pytest -q -m gpu tests/test_mamba3_siso_mixer.py tests/test_mamba3_triton.py \
  2>&1 | tail -4 | tee "$out/tests.log"
summary() { grep -E " @ |kernels; idle" "$1" | cut -c1-160; }
python scripts/host_vs_gpu_train.py MMMAx3 Ax12 > "$out/mixer_4k.log" 2>&1; echo "[default: mixer]"; summary "$out/mixer_4k.log"
HYBRID_MAMBA3_FUSION=compile python scripts/host_vs_gpu_train.py MMMAx3 > "$out/compile_4k.log" 2>&1
echo "[compile]"; summary "$out/compile_4k.log"
python scripts/host_vs_gpu_train.py --seq 16384 Mx12 Ax12 > "$out/mixer_16k.log" 2>&1; echo "[default: mixer]"; summary "$out/mixer_16k.log"
python benchmarks/mamba3_scan.py --out "$out/${1:-mamba3_scan.json}" > "$out/bench.log" 2>&1
tail -28 "$out/bench.log"
