#!/usr/bin/env bash
# Install what the tests need into .venv, then run the test suite (slow tests excluded unless
# SCOREFLOW_SLOW=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SCOREFLOW_NO_PROGRESS=1
marker="not slow"
[ "${SCOREFLOW_SLOW:-0}" = "1" ] && marker=""
exec .venv/bin/python -m pytest -q -m "$marker" "$@"
