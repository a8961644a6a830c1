#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for the lent GPU machine): GPU-marked tests, then the
# benchmarks. Writes a JSON report per step under ${OUT:-gpu-report}/.
#   bash scripts/gpu_suite.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" gpu-report
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# Only the files that hold GPU tests: the others may import packages the GPU image lacks (hydra, wandb).
mapfile -t gpu_files < <(grep -l "mark.gpu" tests/*.py)
# -v with a clock on each line: a slow or hung test shows where the time went even if the call is cut off.
timeout "${TEST_TIMEOUT:-900}" python -m pytest -v -m gpu --durations=15 --junitxml="$out/gpu-tests.xml" "${gpu_files[@]}" 2>&1 \
  | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done | tee "$out/gpu-tests.log"
status=${PIPESTATUS[0]}
# Every launch config of the scan's chunk kernels, finite and bit-identical (a Triton miscompile hid there once).
if [ -z "${SKIP_DETERMINISM:-}" ]; then
  python scripts/check_scan_determinism.py 2>&1 | tee "$out/determinism.log"
  python scripts/check_scan_determinism.py --packed 2>&1 | tee "$out/determinism-packed.log"
fi
for bench in ${BENCHMARKS:-benchmarks/*.py}; do
  [ -f "$bench" ] || continue
  name=$(basename "$bench" .py)
  python "$bench" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
done
exit "$status"
