#!/usr/bin/env bash
# hybrid-bench on the lent GPU machine, one report per call: copies bench.json (and bench.html) to
# ${OUT}/bench-<tag>.json, since the run folder is nested too deep to come back.
#   bash scripts/gpu_bench.sh <tag> [hydra overrides...]
# The device image lacks hydra: run scripts/carry_hydra.sh here first and carry ".whl" (device_setup.sh finds it).
set -uo pipefail
tag=$1; shift
source "$(dirname "$0")/device_setup.sh" gpu-report
export HYBRID_LOG_DIR="$out/logs"
python -m hybrid.bench.cli "$@" 2>&1 | tee "$out/bench-$tag.log"
status=${PIPESTATUS[0]}
json=$(find "$out/logs" -name bench.json | sort | tail -1)
[ -n "$json" ] && cp "$json" "$out/bench-$tag.json" && rm -rf "$out/logs"
exit "$status"
