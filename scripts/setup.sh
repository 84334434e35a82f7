#!/usr/bin/env bash
# Create .venv (Python 3.11) and install transferkit with its test and Ray extras (so the suite tests
# `extract --runner ray` too). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# setuptools warns on every editable install that a folder named like a package may shadow it: these
# folders are the packages themselves, so that banner is silenced (other warnings still show).
PYTHONWARNINGS="ignore:Editable installation:UserWarning" .venv/bin/python -m pip install --quiet -e '.[test,ray]'
