#!/usr/bin/env bash
# The lent GPU machine's image has torch and triton but not hydra: copy this environment's pure-Python hydra,
# omegaconf, antlr4 and yaml packages into .whl/site (git-ignored) and name
# ".whl" in the device call's carry. scripts/device_setup.sh puts .whl/site on PYTHONPATH when it is there.
#   bash scripts/carry_hydra.sh
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(python -c "import os, omegaconf; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))")
rm -rf .whl/site && mkdir -p .whl/site
for pkg in hydra omegaconf antlr4 yaml; do cp -r "$site/$pkg" .whl/site/; done
find .whl/site -name __pycache__ -prune -exec rm -rf {} +
find .whl/site -name "*.so" -delete   # yaml falls back to pure Python; the device's Python may differ
du -sh .whl/site
