#!/usr/bin/env bash
# A development environment: system packages, then a virtual environment in .venv with
# soundedge installed in editable mode with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-system-deps.sh

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
