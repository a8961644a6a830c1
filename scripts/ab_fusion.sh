#!/usr/bin/env bash
# One device call: GPU tests of the opt-in Mamba-3 fusion paths, then the training step under each
# HYBRID_MAMBA3_FUSION mode (docs/perf-notes.md, "The elementwise work around the scan without torch.compile").
# Writes one log per step under ${OUT:-ab-fusion}/ and prints the summary lines.
#   bash scripts/ab_fusion.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-ab-fusion}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install -q --no-deps -e .
HYBRID_TRITON_TUNE=fixed timeout 300 python -m pytest -q -m gpu tests/test_mamba3_siso_mixer.py 2>&1 | tail -3 | tee "$out/tests.log"
summary() { grep -E " @ |kernels; idle" "$1" | cut -c1-160; }
python scripts/host_vs_gpu_train.py MMMAx3 Ax12 > "$out/compile_4k.log" 2>&1; summary "$out/compile_4k.log"
for mode in mixer triton; do
  HYBRID_MAMBA3_FUSION=$mode python scripts/host_vs_gpu_train.py MMMAx3 > "$out/${mode}_4k.log" 2>&1
  echo "[$mode]"; summary "$out/${mode}_4k.log"
done
HYBRID_MAMBA3_FUSION=mixer python scripts/host_vs_gpu_train.py --seq 16384 Mx12 Ax12 > "$out/mixer_16k.log" 2>&1
echo "[mixer]"; summary "$out/mixer_16k.log"
