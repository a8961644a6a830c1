#!/usr/bin/env bash
# One device call (~5 min, one H100): the compiled SwiGLU activation (SwiGLUConfig.fused_elementwise) against the
# eager one in the training step, 8 x 4096 and 2 x 16384 (docs/perf-notes.md, "The SwiGLU activation in one
# kernel each way"). Writes one log per step under ${OUT:-ab-swiglu}/ and prints the summary lines.
#   bash scripts/ab_swiglu.sh
set -uo pipefail
source "$(dirname "$0")/device_setup.sh" ab-swiglu
timeout 200 python -m pytest -q -m gpu tests/test_mlp.py 2>&1 | tail -2 | tee "$out/tests.log"
summary() { grep -E " @ |kernels; idle" "$1" | cut -c1-160; }
for seq in 4096 16384; do
  for variant in eager fused; do
    flag=$([ $variant = eager ] && echo --ffn-eager)
    patterns=$([ $seq = 4096 ] && echo "MMMAx3 Ax12" || echo "Mx12 Ax12")
    python scripts/host_vs_gpu_train.py --seq $seq $flag $patterns > "$out/${variant}_${seq}.log" 2>&1
    echo "[$variant ffn, $seq]"; summary "$out/${variant}_${seq}.log"
  done
done
