#!/usr/bin/env bash
# Run the test suite from a fresh machine: sets up .venv (CPU torch first) and runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/model/test_model.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
