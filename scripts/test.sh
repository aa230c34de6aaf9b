#!/usr/bin/env bash
# The test command (README, CI): set up, lint, type-check, then the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k detector`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/dev-setup.sh
export PATH="$PWD/.venv/bin:$PATH"

echo "== ruff check" >&2
ruff check .
echo "== ruff format --check" >&2
ruff format --check .
echo "== mypy --strict (edge, controller)" >&2
mypy
echo "== pytest" >&2
python -m pytest "$@"
