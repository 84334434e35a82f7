#!/usr/bin/env bash
# Install everything and run the test suite (../shared is used when present, never required).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=3
# One worker per core (at most 4: each worker may hold TensorFlow and a few GB), a test file's tests
# on one worker so module fixtures are built once; the 20 slowest tests are listed at the end.
workers=$(.venv/bin/python -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --durations=20 "$@"
