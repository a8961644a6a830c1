#!/usr/bin/env bash
# Run a command inside the project's Python environment, setting it up first if needed:
#   bash scripts/with-env.sh hybrid-train experiment=quickstart
#   bash scripts/with-env.sh python -m pytest -q
# Uses the active virtual environment if there is one, else ./.venv (created on first use).
# torch is installed first and pinned (TORCH_SPEC), because an unpinned `torch` requirement can pull
# a multi-GB CUDA build even where a CPU build is what you want.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
stamp="$VIRTUAL_ENV/.hybrid-installed"
want="$(cat pyproject.toml scripts/with-env.sh | sha256sum | cut -c1-16) $root"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "with-env: installing torch and hybrid[dev] into $VIRTUAL_ENV" >&2
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
[ "$#" -gt 0 ] || exit 0
exec "$@"
