# Sourced by the scripts that run on the lent GPU machine (gpu_suite.sh, gpu_bench.sh, ab_*.sh):
#   source "$(dirname "$0")/device_setup.sh" <default output folder>
# Goes to the repo root, sets $out (the device tool's $OUT, else the default) and creates it, exports the settings
# every measurement here ran with, puts carried packages (.whl/site, scripts/carry_hydra.sh) on the path, and
# installs this checkout over the image's copy without touching its dependencies.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-$1}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if [ -d .whl/site ]; then export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"; fi
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install -q --no-deps -e .
